"""The pipeline run's driver: the run directory and its state (run_dir.py, state.py), Ray
(ray_session.py), the preflight of every node (preflight.py), storage (storage.py), and the
loop over phases (run.py), each phase fitted on Ray Train (phase_driver.py ->
pipeline.phases.ray_train)."""
