"""Using a trained generator: loading one (generator.py; registered models in model_uri.py),
the tools' shared arguments and files (args.py, files.py), and the MLflow model
(registry.py). The verbs themselves are in pipeline.cli."""
