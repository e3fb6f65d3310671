"""Measurement suite (run as ``python -m benchmarks.<name>``)."""
