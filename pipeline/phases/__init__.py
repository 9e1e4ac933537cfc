"""Where a phase runs: one `PhaseSession` (session.py) owns a phase's life on a rank (restore,
train with progan.loop, checkpoint in the one layout of checkpoints.py, evaluate, draw the
sample grid, export generator.pt); three hosts run it and differ only in their sinks:

    ray_train.py   `progan run`/`resume`/`submit`: a Ray Train TorchTrainer per phase, a session
                   on every rank (DDP), reports + checkpoints to Ray, MLflow (mlflow_sink.py),
                   the driver's mailbox (mailbox.py)
    tune_trial.py  `progan tune`: every phase of a single-worker trial in its process, each
                   checkpoint a Tune result + checkpoint, MLflow (mlflow_sink.py)
    local.py       `progan train-local`: every phase in one process into a folder, no Ray or
                   MLflow
"""
