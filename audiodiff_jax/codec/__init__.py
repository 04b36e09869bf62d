"""The neural audio codec: a convolutional waveform VAE in Flax NNX (docs/DESIGN.md, contract 3).

``load_codec()`` opens the default shipped in the package; see ``codec.py``.
"""

from audiodiff_jax.codec.codec import JaxCodec, load_codec
from audiodiff_jax.codec.inputs import CodecInputError
from audiodiff_jax.codec.interface import Codec

__all__ = ["Codec", "CodecInputError", "JaxCodec", "load_codec"]
