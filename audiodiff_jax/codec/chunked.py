"""Any-length encode / decode in overlapping, cross-faded chunks of one fixed shape.

A sequence of ``F`` frames (latent frames; audio is ``F * hop`` samples) is cut into
chunks of ``chunk_frames`` frames that start every ``chunk_frames - overlap_frames``
frames. Chunks run through the network ``batch_size`` at a time, all of one shape, so
the jitted function compiles once and device memory is bounded by ``batch_size``
chunks whatever the length (a 6-minute song included); only the output is kept
whole, on the host.

Neighbouring chunks are joined over their ``overlap_frames`` by complementary
weights that sum to one: the first quarter of the overlap belongs entirely to the
earlier chunk, the last quarter to the later one, and a raised-cosine crossfade runs
in between. Every sample that gets weight from a chunk is therefore at least
``overlap_frames / 4`` frames from that chunk's cut edge. The codec's convolutions are
centred with a finite receptive field; when that margin covers the receptive field,
both chunks agree with the single-pass result there and the join is exact up to
float rounding (for the shipped ``small`` weights a margin of 8 frames already matches
the single pass to 1e-6; the default overlap of 64 gives a margin of 16). With a
shorter overlap the chunks disagree slightly near their edges and the crossfade
spreads the difference smoothly instead of leaving a step.

The last chunk is moved back to end exactly where the sequence ends (it then shares
more frames with its neighbour; the crossfade sits in the middle of what they share).
Zero-padding the input instead would not do: the single pass pads every layer's
activations with zeros at the end, and zero *audio* does not give zero activations
(biases), so a padded last chunk would differ from the single pass near the end.
Inputs no longer than one chunk go through in one call: of their own length, or, with
``bucket`` (what the codec passes), zero-padded at the end to a few fixed lengths
(:func:`bucket_frames`: powers of two up to the chunk) and cut back, so clips of many
lengths share a handful of compiled programs instead of one each. The padding is
silence after the clip, which only the last frames' receptive field sees.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def crossfade_weights(overlap: int) -> np.ndarray:
    """Weights ``[overlap]`` of the later chunk across an overlap (the earlier gets 1 - w).

    0 over the first quarter, a raised cosine over the middle half, 1 over the last quarter.
    """
    if overlap <= 0:
        return np.zeros((0,), np.float32)
    margin = overlap // 4
    ramp = overlap - 2 * margin
    w = np.zeros((overlap,), np.float64)
    t = (np.arange(ramp) + 0.5) / ramp
    w[margin : margin + ramp] = 0.5 - 0.5 * np.cos(np.pi * t)
    w[margin + ramp :] = 1.0
    return w.astype(np.float32)


def bucket_frames(frames: int, chunk_frames: int, smallest: int = 16) -> int:
    """The padded length of a short input: the smallest power of two >= ``frames`` (at
    least ``smallest``), at most ``chunk_frames``."""
    n = smallest
    while n < frames:
        n *= 2
    return min(n, chunk_frames) if frames <= chunk_frames else frames


def chunk_starts(num_frames: int, chunk_frames: int, overlap_frames: int) -> list[int]:
    """First frame of every chunk covering ``num_frames`` frames (``num_frames > chunk_frames``).

    Chunks start every ``chunk_frames - overlap_frames`` frames; the last one is moved
    back to end exactly at the last frame (it then overlaps its neighbour by more).
    """
    step = chunk_frames - overlap_frames
    starts = list(range(0, num_frames - chunk_frames, step))
    return starts + [num_frames - chunk_frames]


def _ramp_window(r0: int, lo: int, length: int, fade: np.ndarray) -> np.ndarray:
    """Samples ``[lo, lo + length)`` of the boundary ramp that starts at ``r0``: 0 before it,
    ``fade`` from there, 1 after (computed for the window only: memory is per chunk)."""
    g = np.arange(lo, lo + length) - r0
    inside = fade[np.clip(g, 0, len(fade) - 1)]
    return np.where(g < 0, 0.0, np.where(g >= len(fade), 1.0, inside)).astype(np.float32)


def chunked_apply(
    fn: Callable[[np.ndarray], np.ndarray],
    x_tc: np.ndarray,
    *,
    in_per_frame: int,
    out_per_frame: int,
    chunk_frames: int,
    overlap_frames: int,
    batch_size: int = 1,
    bucket: bool = False,
) -> np.ndarray:
    """Runs ``fn`` over ``x_tc`` in overlapping chunks and cross-fades the results.

    Args:
      fn: ``[batch, frames * in_per_frame, C_in]`` -> ``[batch, frames * out_per_frame,
        C_out]`` (numpy in, array-like out). Called with exactly ``batch_size`` chunks of
        ``chunk_frames`` (the last call padded with copies), or once with the whole
        input when it is no longer than one chunk.
      x_tc: ``[frames * in_per_frame, C_in]``; its length must be a whole number of frames.
      in_per_frame / out_per_frame: time steps per frame on each side (encode: hop, 1;
        decode: 1, hop).
      chunk_frames: frames per chunk.
      overlap_frames: frames shared by neighbouring chunks, in ``[4, chunk_frames / 2]``.
      batch_size: chunks per call of ``fn``.
      bucket: pad an input no longer than one chunk to :func:`bucket_frames` frames
        (zeros at the end) and cut the output back: a few shapes for any length.

    Returns:
      ``[frames * out_per_frame, C_out]`` float32.
    """
    if not 4 <= overlap_frames <= chunk_frames // 2:
        raise ValueError(
            f"overlap_frames={overlap_frames} must be in [4, chunk_frames / 2 = {chunk_frames // 2}]"
        )
    if x_tc.shape[0] % in_per_frame:
        raise ValueError(f"input length {x_tc.shape[0]} is not a multiple of {in_per_frame} per frame")
    num_frames = x_tc.shape[0] // in_per_frame
    if num_frames <= chunk_frames:
        x = np.asarray(x_tc, np.float32)
        if bucket:
            padded = bucket_frames(num_frames, chunk_frames)
            x = np.pad(x, ((0, (padded - num_frames) * in_per_frame), (0, 0)))
        return np.asarray(fn(x[None]), np.float32)[0][: num_frames * out_per_frame]
    starts = chunk_starts(num_frames, chunk_frames, overlap_frames)
    total = num_frames * out_per_frame
    ov_out = overlap_frames * out_per_frame
    fade = crossfade_weights(ov_out)
    # One ramp per boundary, centred in the region the two chunks share (the last
    # region is longer than overlap_frames); chunk k's weight is ramp[k-1] * (1 - ramp[k]),
    # so the weights of all chunks sum to one at every sample. Only each ramp's start is
    # kept; its values are made per chunk, so memory is the output plus the chunks in flight.
    ramp_starts = [
        (a + b + chunk_frames) * out_per_frame // 2 - ov_out // 2
        for a, b in zip(starts[1:], starts[:-1], strict=True)
    ]
    L_in, L_out = chunk_frames * in_per_frame, chunk_frames * out_per_frame
    x = np.asarray(x_tc, np.float32)
    out = None
    for b0 in range(0, len(starts), batch_size):
        group = starts[b0 : b0 + batch_size]
        batch = np.stack([x[s * in_per_frame : s * in_per_frame + L_in] for s in group])
        if len(group) < batch_size:  # keep one shape: one compilation
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(group), axis=0)])
        y = np.asarray(fn(batch), np.float32)
        if out is None:
            out = np.zeros((total, y.shape[-1]), np.float32)
        for i, s in enumerate(group):
            k = b0 + i
            o = s * out_per_frame
            w = np.ones((L_out,), np.float32)
            if k > 0:
                w *= _ramp_window(ramp_starts[k - 1], o, L_out, fade)
            if k < len(starts) - 1:
                w *= 1.0 - _ramp_window(ramp_starts[k], o, L_out, fade)
            out[o : o + L_out] += y[i] * w[:, None]
    return out
