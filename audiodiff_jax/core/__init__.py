"""Shared infrastructure below every stage: the typed config, names, sharding, multi-host, metrics, pages."""
