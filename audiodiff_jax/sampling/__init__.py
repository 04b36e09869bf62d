"""Sampling from weights in memory: the sampler (windows, masked context, decoding) and seam measures."""
