"""Benchmarks behind ``dassdp bench``, on one harness (:mod:`dassdp.bench.harness`) over the
engine's training step; each writes its own section of ``docs/benchmarks.md``."""
