"""Thin Prefect tasks over the core (``ballast``) and the registry facade (``model_registry``)."""
