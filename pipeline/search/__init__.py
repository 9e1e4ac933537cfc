"""Hyperparameter search on Ray Tune: specs (spec.py, space.py), the sweep (sweep.py), its
schedulers (schedulers.py), what a trial runs (trial.py -> pipeline.phases.tune_trial), and
the summary (summary.py)."""
