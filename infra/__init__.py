"""Deployable infrastructure around the ``ballast`` core: the serving gateway and its monitoring.

``ballast`` never imports ``infra`` (dependency direction); it starts the gateway by module name.
"""
