"""DreamBooth fine-tuning: the parameters, the data, the Lightning module, the
trainer and the worker process that runs one job (``python -m
diffusion_service.dreambooth.worker JOB_DIR``).

Only :mod:`diffusion_service.dreambooth.params` is imported by the service
process itself; everything that needs torch, diffusers or Lightning runs in
the worker.
"""
