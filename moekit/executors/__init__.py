"""Executors run plans: in memory (state dicts), streaming file to file, and per EP rank."""
