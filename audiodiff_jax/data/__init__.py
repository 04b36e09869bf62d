"""The data contracts shared by the pipeline, the trainer and the sampler.

``cards`` (dataset and codec cards, latent normalization), ``records`` (the shard
format and its reader), ``tokenizer``, ``batch`` (the typed training batch) and
``loader`` (the Grain pipeline). ``data_pipeline`` builds datasets with these; the
library never imports ``data_pipeline``.
"""
