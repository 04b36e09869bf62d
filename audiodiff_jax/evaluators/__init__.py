"""Evaluators the training program hands to the loop (validation loss, demo samples)."""
