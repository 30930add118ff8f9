"""Benchmarks: ``python bench/all.py`` rewrites BENCHMARKS.md (see its docstring)."""
