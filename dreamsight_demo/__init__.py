"""The demo toolchain: what builds, trains, installs and judges the toy demo models.

Nothing here runs in production, and no service imports it (tests/test_layout.py
checks): the services only run a model directory. ``shapes`` is the synthetic
world and its judge; ``llava`` and ``sd`` build random-weight demo models for
the plumbing tests; ``model_card`` writes the marker and model card that label
each one a toy (the services only read the marker); ``train_llava`` and
``train_sd`` train the committed ones (``make demo-models``); ``weights``
checks and installs them (``dreamsight up`` runs ``python -m
dreamsight_demo.weights install``); ``demo`` is ``make demo``; ``measure`` and
``cuda_check`` measure quality and CUDA parity.
"""
