"""The serving gateway: one model's champion and canary behind a weighted HTTP router.

Run it with ``python -m infra.gateway --host 127.0.0.1 --port 8765``; build the ASGI app in-process
with :func:`infra.gateway.app.create_app`. Importing this package has no side effects.
"""
