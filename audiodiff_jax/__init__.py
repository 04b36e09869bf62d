"""audiodiff-jax: latent audio diffusion transformers trained on device meshes."""

import time as _time

# When this process first imported the package (before jax and the model): the start of
# the goodput account's start-up time (audiodiff_jax/training/goodput.py).
IMPORT_TIME = _time.time()
