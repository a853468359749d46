"""The DreamBooth job plane: jobs, their store, leases, events and files.

- :mod:`.engine`: the interface the servicer calls;
- :mod:`.manager`: that interface on one replica (claims, leases, watching);
- :mod:`.store`: the job store's interface, with :mod:`.sqlite_store` and
  :mod:`.postgres_store` over the SQL they share (:mod:`.sql_store`);
- :mod:`.worker_process` and :mod:`.worker_events`: a job's worker process
  and the typed messages it sends the manager;
- :mod:`.artifacts`: the shared artifacts directory;
- :mod:`.params_check`: the checks on a new job that need its base model.

The trainer itself is :mod:`diffusion_service.dreambooth`. "Job" means a
training job here; a Generate call is a generation, never a job.
"""
