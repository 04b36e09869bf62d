"""Model size presets, decoded from one table (as big_vision's "B/16").

Config files call ``apply_preset(config.model, "1B")``; the preset sets only size
fields (widths, depths, heads, MLP ratios) and ``model.preset``. Everything else
(latent channels from the codec, vocabulary from the tokenizer) stays with the config.

:data:`PARAM_COUNTS` holds the exact parameter count of each preset under the
production assumptions of ``configs/dit.py``: ``latent_channels=64`` (Stable Audio's
codec), ``text.vocab_size=8192`` (a caption sentencepiece model), ``freq_dim=256``.
``tests/test_model.py`` checks it by building every preset abstractly.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections


class Preset(NamedTuple):
    width: int
    depth: int
    num_heads: int
    text_width: int
    text_depth: int
    text_heads: int


# Head dims: 64 up to XL, 128 for 1B and 3B (the cuDNN / splash kernels run fastest at
# 128, and the 1B target runs 6,460-frame sequences where attention is ~38% of the FLOPs).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 2, 2, 64, 1, 2),
    "S": Preset(384, 9, 6, 256, 4, 4),
    "B": Preset(768, 8, 12, 512, 6, 8),
    "L": Preset(1024, 16, 16, 768, 8, 12),
    "XL": Preset(1152, 20, 18, 768, 12, 12),
    "1B": Preset(1536, 18, 12, 768, 12, 12),
    "3B": Preset(2048, 30, 16, 1024, 12, 16),
}
MLP_RATIO = 4.0

# Assumptions of PARAM_COUNTS (fields that presets do not set). Without masked context
# (``model.masked_context``, on in configs/dit.py): it adds (latent_channels + 1) x width
# to the input projection (the known latents and their mask).
COUNT_ASSUMPTIONS = {"latent_channels": 64, "freq_dim": 256, "text.vocab_size": 8192}
PARAM_COUNTS: dict[str, int] = {
    "tiny": 838_976,  # 0.84M, of which 0.52M the 8192-token embedding
    "S": 35_680_192,
    "B": 131_027_264,
    "L": 439_245_376,
    "XL": 684_106_560,
    "1B": 1_040_329_792,
    "3B": 2_953_476_672,
}


def apply_preset(model: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Sets the size fields of a ``model`` config section from ``PRESETS[name]``.

    Returns the same ConfigDict, for chaining.
    """
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is not a preset; one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    model.preset = name
    model.width = p.width
    model.depth = p.depth
    model.num_heads = p.num_heads
    model.mlp_ratio = MLP_RATIO
    model.text.width = p.text_width
    model.text.depth = p.text_depth
    model.text.num_heads = p.text_heads
    model.text.mlp_ratio = MLP_RATIO
    return model
