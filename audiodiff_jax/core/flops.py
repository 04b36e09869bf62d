"""Model FLOPs of a training step, and the peak FLOP/s of accelerators: the two halves of MFU.

MFU convention (PaLM appendix B): count the matmul FLOPs the model needs, forward and
backward, and nothing else: no rematerialization recompute, no elementwise ops, padded
frames counted as real (they are computed). With ``B`` examples of ``T`` latent frames and
``L`` caption tokens, ``w`` the DiT width, ``d`` its depth, ``m`` its MLP width, ``C``
latent channels, ``f`` the frequency-embedding size, and ``wt, dt, mt`` the text
encoder's width, depth and MLP width::

    per-frame matmul params   N_frame = C*w + d*(4w^2 + 2w^2 + 2*w*m) + w*C
                              (input proj; self-attn q,k,v,o; cross-attn q,o; MLP; output proj)
    per-token matmul params   N_token = dt*(4*wt^2 + 2*wt*mt) + wt*w + d*2w^2
                              (text layers; projection to w; cross-attn k,v of every block)
    per-example params        N_ex    = 3*(f*w + w^2) + d*6w^2 + 2w^2
                              (timestep/timing MLPs; AdaLN modulation of blocks and final layer)

    FLOPs = 6 * (B*T*N_frame + B*L*N_token + B*N_ex)          # 2 per MAC, x3 for fwd + bwd
          + 12 * B * d * w * (T^2 + T*L)                       # self- and cross-attention scores and
          + 12 * B * dt * wt * L^2                             #   weighted sums (4*n*n'*w fwd, x3)

Each matmul costs 2 FLOPs per multiply-add forward and twice that backward (gradients
with respect to both its inputs), hence 6 per parameter per token and 12 for attention.
"""

from __future__ import annotations

from typing import Any

from audiodiff_jax.core.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, matched against ``device.device_kind`` in this order
# (more specific names first: "H100 PCIe" before "H100", "v5 lite" before "v5").
# Sources: the vendors' datasheets (NVIDIA's list "with sparsity" figures: dense is half)
# and Google Cloud's TPU system-architecture pages.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),  # NVIDIA H100 datasheet, PCIe column
    ("H100", 989e12),  # NVIDIA H100 datasheet, SXM column (1,979 with sparsity)
    ("H200", 989e12),  # NVIDIA H200 datasheet, SXM: the H100's tensor cores
    ("A100", 312e12),  # NVIDIA A100 datasheet
    ("TPU v6 lite", 918e12),  # Cloud TPU docs, Trillium (v6e)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # Cloud TPU docs, v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),  # Cloud TPU docs, v5p
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),  # Cloud TPU docs, v4
)


def train_flops_per_step(model_cfg: ModelConfig, batch: int, frames: int, text_len: int) -> float:
    """Model FLOPs (forward + backward, no remat) of one step on ``batch`` x ``frames``.

    Args:
      model_cfg: the model.
      batch: global batch size (examples per step).
      frames: latent frames per example (the training window).
      text_len: caption tokens per example (``model.text.max_len``).
    """
    w, d, c, f = model_cfg.width, model_cfg.depth, model_cfg.latent_channels, model_cfg.freq_dim
    m = int(w * model_cfg.mlp_ratio)
    tc = model_cfg.text
    wt, dt, mt = tc.width, tc.depth, int(tc.width * tc.mlp_ratio)
    b, t, n = float(batch), float(frames), float(text_len)
    n_frame = c * w + d * (6 * w * w + 2 * w * m) + w * c
    n_token = dt * (4 * wt * wt + 2 * wt * mt) + wt * w + d * 2 * w * w
    n_example = 3 * (f * w + w * w) + d * 6 * w * w + 2 * w * w
    dense = 6.0 * (b * t * n_frame + b * n * n_token + b * n_example)
    attention = 12.0 * b * d * w * (t * t + t * n) + 12.0 * b * dt * wt * n * n
    return dense + attention


def peak_flops_per_device(device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (a ``jax.Device``), or None if unknown (CPU)."""
    if getattr(device, "platform", "") == "cpu":
        return None
    kind = str(getattr(device, "device_kind", ""))
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None
