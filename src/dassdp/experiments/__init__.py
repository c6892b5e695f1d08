"""Paired multi-seed experiments: the runner, statistics and the report."""
