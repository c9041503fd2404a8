"""Ballast: a release system for ML models.

The core package is plain Python: no Prefect and no MLflow imports. Heavy libraries (torch,
great_expectations, onnxruntime) are imported inside the functions that need them so that the CLI
starts fast and importing a module never has side effects.
"""

__version__ = "0.1.0"
