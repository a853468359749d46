"""The dreamsight gateway: keys, tiers, metering, the gRPC and HTTP front ends, metrics.

Grouped by concern, so that each rule lives once:

- the core (this package): ``core.py`` (admission: key, budgets, a slot, the
  call's GPU-second allowance; finishing: slot, metrics, the bill),
  ``calls.py`` (the one lifecycle of a metered call, on every ending),
  ``admission.py`` (concurrency limits), ``budgets.py``, ``keys.py``,
  ``store.py`` (keys and the ledger), ``tiers.py``, ``training.py`` (billing
  DreamBooth jobs), ``metrics.py``, ``config.py`` and ``server.py``;
- ``grpc_api/``: the gRPC pass-through and the gateway's own services;
- ``http_api/``: the Ollama and OpenAI APIs, with their error mapping
  (``errors.py``), body reading (``body.py``) and upstream calls
  (``upstream.py``).
"""
