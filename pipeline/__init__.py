"""Orchestration: config, phase plan, Ray Train jobs, MLflow tracking, Ray Tune, the CLI."""
