"""Ratio benchmarks: ours vs a baseline, measured in the same process (``python -m benchmarks``)."""
