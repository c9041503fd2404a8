"""The serving gateway: a model's champion, canary and shadow behind a weighted HTTP router.

Run it with ``python -m infra.gateway --host 127.0.0.1 --port 8765 [--workers N]``; build the ASGI
app in-process with :func:`infra.gateway.app.create_app`. Modules: ``app`` (routes, routing,
admin API), ``batcher`` (dynamic batching), ``wire`` (JSON and .npy bodies), ``auth`` (role
tokens), ``desired`` (desired state and replica board), ``registry_source`` (desired state from
the model registry), ``supervisor`` (several replicas on one port), ``metrics``, ``openapi``,
``faillog`` (failed requests as bounded JSON log lines, by request id), ``heartbeat`` (the
champion watchdog's heartbeat body).
Importing this package has no side effects.
"""
