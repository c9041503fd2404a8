"""Benchmarks runnable by anyone as ``ballast bench <name>`` (each module has ``main(argv)``)."""
