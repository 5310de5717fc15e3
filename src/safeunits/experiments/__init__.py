"""Declarative experiments: a YAML chain of steps (evaluate, align, attribute, ...) run with a hash-based cache,
ending in one report (docs/experiments.md)."""
