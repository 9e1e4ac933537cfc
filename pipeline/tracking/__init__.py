"""MLflow tracking on the driver's side: the experiment, runs, datasets, tables (`tracker`),
the queued logger a training rank uses (`metric_logger`), the loss-curve plot (`plots`), and
how secrets (tokens, passwords in URIs) stay out of everything recorded (`secrets`).
What a phase logs is pipeline.phases.mlflow_sink; the registered generator is
pipeline.tools.registry's."""
