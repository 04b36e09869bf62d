"""Data pipeline: latent shard format, tokenizer training, Grain loaders, demo data.

Read in this order: ``shards`` (what a latent shard and its dataset card are),
``tokenizer`` (caption ids), ``loader`` (shards -> per-host batches -> global arrays),
``demo_shards`` (synthetic shards until the real codec lands).
"""
