"""Benchmarks run by ``python -m medjax.bench NAME``; each module here defines ``main(argv)``."""
