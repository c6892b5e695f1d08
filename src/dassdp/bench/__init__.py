"""Benchmarks behind ``dassdp bench``; each writes its own section of ``docs/benchmarks.md``."""
