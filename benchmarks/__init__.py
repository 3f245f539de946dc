"""Benchmarks: each script prints a table and, last, one JSON line. Run them as `python -m benchmarks.NAME`."""
