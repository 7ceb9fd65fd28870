"""Benchmarks of tailor on real trained models (run from the repository root: python -m benchmarks.NAME)."""
