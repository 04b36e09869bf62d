"""Sampling sweeps: grids of prompts and settings, manifests, WAVs, report pages, shared sweeps."""
