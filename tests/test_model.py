"""Tests of the DiT: shapes, AdaLN-zero init, masking of padded frames and tokens,
RoPE, bf16, remat, the attention function, and the preset parameter counts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core.config import ModelConfig
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.model import count_params, make_model
from audiodiff_jax.model.attention import apply_rope, dot_product_attention, rope_tables
from audiodiff_jax.model.dit import DiTBlock
from audiodiff_jax.model.layers import ParamKeys
from audiodiff_jax.model.presets import COUNT_ASSUMPTIONS, PARAM_COUNTS, PRESETS, apply_preset

CFG = ModelConfig()  # tiny: latent 8, width 64, depth 2, 2 heads, text 64 x 1
B, T, L = 2, 16, 8


def _inputs(seed=1, num_frames=(16, 11)):
    ks = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(ks[0], (B, T, CFG.latent_channels), jnp.float32)
    t = jax.random.uniform(ks[1], (B,))
    tokens = jnp.array([[5, 6, 7, 0, 0, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 2]], jnp.int32)
    return dict(
        x_btc=x,
        t_b=t,
        tokens_bl=tokens,
        seconds_start_b=jnp.array([0.0, 30.0]),
        seconds_total_b=jnp.array([95.0, 240.0]),
        num_frames_b=jnp.array(num_frames, jnp.int32),
    )


def _args(inp):
    """The model's positional inputs (x, t, cond) from an ``_inputs()`` dict."""
    cond = Conditioning(inp["tokens_bl"], inp["seconds_start_b"], inp["seconds_total_b"], inp["num_frames_b"])
    return inp["x_btc"], inp["t_b"], cond


def _randomize_zeros(params, seed=7, scale=0.05):
    """Replaces every all-zero parameter (the AdaLN-zero / zero-init ones, biases) with noise,
    so that every path of the network is active, as after some training."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        scale * jax.random.normal(k, p.shape, p.dtype) if not np.any(np.asarray(p)) else p
        for k, p in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


@pytest.fixture(scope="module")
def fns():
    return make_model(CFG)


@pytest.fixture(scope="module")
def params(fns):
    return jax.jit(fns.init)(jax.random.key(0))


@pytest.fixture(scope="module")
def active_params(params):
    return _randomize_zeros(params)


@pytest.fixture(scope="module")
def apply(fns):
    return jax.jit(fns.apply)


def test_shapes_dtypes_and_structure(fns, params, apply, active_params):
    out = apply(active_params, *_args(_inputs()))
    assert out.shape == (B, T, CFG.latent_channels) and out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    abstract = fns.abstract_params()
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params
    )
    assert count_params(abstract) == count_params(params)
    # every parameter has one logical axis name per dimension; keys are strings (Orbax round trip)
    axes = fns.logical_axes()
    is_axes = lambda x: isinstance(x, tuple)
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    for ax, p in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params), strict=True):
        assert len(ax) == p.ndim and all(isinstance(a, str) for a in ax)
    assert set(params["blocks"]) == {"0", "1"}


def test_output_is_zero_at_init_and_not_after_perturbing(params, apply):
    out = apply(params, *_args(_inputs()))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    perturbed = jax.tree.map(lambda p: p, params)
    kernel = perturbed["final_layer"]["linear"]["kernel"]
    perturbed["final_layer"]["linear"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3), kernel.shape)
    out = apply(perturbed, *_args(_inputs()))
    assert np.all(np.isfinite(out)) and float(jnp.abs(out).mean()) > 1e-3


def test_each_block_starts_as_identity():
    block = DiTBlock(CFG, dtype=jnp.float32, param_dtype=jnp.float32, keys=ParamKeys(jax.random.key(0)))
    ks = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(ks[0], (B, T, CFG.width))
    c = jax.random.normal(ks[1], (B, CFG.width))
    ctx = jax.random.normal(ks[2], (B, L, CFG.width))
    rope = rope_tables(T, CFG.width // CFG.num_heads, CFG.rope_theta)
    run = nnx.jit(lambda blk, *args: blk(*args))  # jitted: op-by-op execution is slow
    y = run(block, x, c, ctx, jnp.ones((B, L), bool), jnp.ones((B, T), bool), rope)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_padded_frames_do_not_affect_valid_frames(active_params, apply):
    inp = _inputs(num_frames=(16, 11))
    out1 = apply(active_params, *_args(inp))
    x2 = inp["x_btc"].at[1, 11:].set(100.0 * jax.random.normal(jax.random.key(9), (5, CFG.latent_channels)))
    out2 = apply(active_params, *_args({**inp, "x_btc": x2}))
    np.testing.assert_allclose(out1[1, :11], out2[1, :11], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out1[0], out2[0])
    # the change is visible where it is not masked: same edit with all 16 frames valid
    out3 = apply(active_params, *_args({**inp, "x_btc": x2, "num_frames_b": jnp.array([16, 16])}))
    assert float(jnp.abs(out3[1, :11] - out1[1, :11]).max()) > 1e-3


def test_text_padding_does_not_change_output(active_params, apply):
    inp = _inputs()
    out = apply(active_params, *_args(inp))
    # fewer pad tokens (shorter padded length) -> same output
    short = {**inp, "tokens_bl": inp["tokens_bl"][:, :4].at[1, 3].set(0)}
    ref_short_row1 = apply(active_params, *_args({**inp, "tokens_bl": inp["tokens_bl"].at[1, 3:].set(0)}))
    out_short = apply(active_params, *_args(short))
    np.testing.assert_allclose(out_short[0], out[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out_short[1], ref_short_row1[1], rtol=0, atol=1e-6)
    # the embedding of the pad id is never seen
    p2 = jax.tree.map(lambda p: p, active_params)
    emb = p2["text_encoder"]["token_embedding"]
    p2["text_encoder"]["token_embedding"] = emb.at[0].set(5.0)
    np.testing.assert_allclose(apply(p2, *_args(inp)), out, rtol=0, atol=1e-6)
    # ...while a real token's embedding is
    p2["text_encoder"]["token_embedding"] = emb.at[5].set(5.0)
    assert float(jnp.abs(apply(p2, *_args(inp))[0] - out[0]).max()) > 1e-4


def test_all_pad_caption_is_finite_with_finite_grads(fns, active_params):
    inp = {**_inputs(), "tokens_bl": jnp.zeros((B, L), jnp.int32)}
    loss = lambda p: jnp.mean(fns.apply(p, *_args(inp)) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss))(active_params)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_rope_makes_scores_relative():
    hd, n, offset = 16, 12, 37
    ks = jax.random.split(jax.random.key(0), 2)
    q = jax.random.normal(ks[0], (1, n, 1, hd))
    k = jax.random.normal(ks[1], (1, n, 1, hd))
    cos, sin = rope_tables(n + offset, hd, 10000.0)
    scores = lambda a, b: jnp.einsum("bthd,bshd->ts", a, b)
    s0 = scores(apply_rope(q, cos[:n], sin[:n]), apply_rope(k, cos[:n], sin[:n]))
    s1 = scores(apply_rope(q, cos[offset:], sin[offset:]), apply_rope(k, cos[offset:], sin[offset:]))
    np.testing.assert_allclose(s0, s1, rtol=1e-4, atol=1e-4)
    # and positions matter: unrotated scores differ
    assert float(jnp.abs(s0 - scores(q, k)).max()) > 1e-2


def test_xla_attention_matches_numpy_reference():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[0, 4:] = False
    out = dot_product_attention(q, k, v, impl="xla", kv_mask_bs=jnp.asarray(mask))
    ref = np.zeros_like(q)
    for b in range(2):
        for h in range(3):
            s = q[b, :, h] @ k[b, :, h].T / np.sqrt(8)
            s = np.where(mask[b][None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            ref[b, :, h] = p @ v[b, :, h]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    # a row with no valid key gives exactly zero
    mask[1] = False
    out = dot_product_attention(q, k, v, impl="xla", kv_mask_bs=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    with pytest.raises(ValueError, match="model.attention"):
        dot_product_attention(q, k, v, impl="flash")


def test_splash_attention_interpret_matches_xla(monkeypatch):
    """The splash wrapper (layout, scaling, segment-id masking, shard_map over the mesh)
    run in Pallas interpret mode on CPU."""
    from audiodiff_jax.core import sharding
    from audiodiff_jax.model import attention

    monkeypatch.setattr(attention, "_SPLASH_INTERPRET", True)
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (4, 128, 2, 64), jnp.float32) for kk in ks)
    mask = jnp.arange(128)[None] < jnp.array([100, 128, 1, 0])[:, None]
    ref = dot_product_attention(q, k, v, impl="xla", kv_mask_bs=mask)
    splash = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, impl="splash", kv_mask_bs=m))
    try:
        out = splash(q, k, v, mask)
    except Exception as e:  # interpret mode of TPU kernels is best-effort on CPU
        pytest.skip(f"splash interpret mode unavailable here: {type(e).__name__}: {e}")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(np.asarray(out[3]), 0.0)  # no valid key
    mesh = sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, sequence=1, tensor=2))
    with jax.set_mesh(mesh):
        out = splash(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-3, atol=2e-3)
    # Lengths that are not block multiples (a 100-frame window, 40 caption tokens) run the
    # kernel too: padded to 128, the padded keys masked, the padded queries cut off.
    out = splash(q[:, :100], k[:, :40], v[:, :40], mask[:, :40])
    ref = dot_product_attention(q[:, :100], k[:, :40], v[:, :40], impl="xla", kv_mask_bs=mask[:, :40])
    assert out.shape == (4, 100, 2, 64)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-3, atol=2e-3)


def test_cudnn_path_passes_padding_as_lengths():
    """The cudnn wiring (masks -> key_value_seq_lengths) checked through jax.nn's XLA backend,
    since cuDNN itself needs a GPU."""
    from audiodiff_jax.model import attention

    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (3, 8, 2, 16), jnp.float32) for kk in ks)
    mask = jnp.arange(8)[None] < jnp.array([8, 5, 1])[:, None]
    got = attention._jax_nn_attention(q, k, v, mask, implementation="xla")
    ref = dot_product_attention(q, k, v, impl="xla", kv_mask_bs=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="model.dtype='bfloat16'"):
        dot_product_attention(q, k, v, impl="cudnn", kv_mask_bs=mask)


def test_bf16_compute_close_to_fp32(active_params):
    inp = _inputs()
    out32 = jax.jit(make_model(CFG).apply)(active_params, *_args(inp))
    cfg16 = config_lib.replace(CFG, dtype="bfloat16")
    out16 = jax.jit(make_model(cfg16).apply)(active_params, *_args(inp))
    assert out16.dtype == jnp.float32
    err = float(jnp.abs(out16 - out32).max())
    scale = float(jnp.abs(out32).max())
    assert scale > 1e-2 and err < 0.05 * scale, (err, scale)


def _loss_grad(remat: str, params):
    inp = _inputs()
    fns = make_model(config_lib.replace(CFG, remat=remat))
    loss = lambda p: jnp.mean((fns.apply(p, *_args(inp)) - inp["x_btc"]) ** 2)
    return jax.grad(loss), params


def _num_remat_regions(fn, *args) -> int:
    # jax.checkpoint shows up as "checkpoint" before differentiation, "remat2" after
    return len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jax.make_jaxpr(fn)(*args))))


@pytest.fixture(scope="module")
def grads_without_remat(active_params):
    grad_fn, p = _loss_grad("none", active_params)
    assert _num_remat_regions(grad_fn, p) == 0
    return jax.jit(grad_fn)(p)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_same_grads(policy, active_params, grads_without_remat):
    grad_fn, p = _loss_grad(policy, active_params)
    # the policy is really applied: one checkpoint region per block
    assert _num_remat_regions(grad_fn, p) == CFG.depth
    got = jax.jit(grad_fn)(p)
    for a, b in zip(jax.tree.leaves(grads_without_remat), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["none", "dots_with_no_batch_dims_saveable"])
def test_scan_layers_matches_unrolled_blocks(remat, active_params, grads_without_remat, apply):
    """``model.scan_layers`` runs the same blocks as one lax.scan over the same stored
    parameters: outputs and gradients equal the unrolled model's, and the traced
    program holds one scan of ``depth`` steps instead of ``depth`` block copies."""
    inp = _inputs()
    fns = make_model(config_lib.replace(CFG, scan_layers=True, remat=remat))
    assert jax.tree.structure(fns.abstract_params()) == jax.tree.structure(active_params)
    want = apply(active_params, *_args(inp))
    np.testing.assert_allclose(jax.jit(fns.apply)(active_params, *_args(inp)), want, atol=1e-6)
    loss = lambda p: jnp.mean((fns.apply(p, *_args(inp)) - inp["x_btc"]) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(active_params))
    assert re.findall(r"length=(\d+)", jaxpr).count(str(CFG.depth)) >= 2  # forward and backward scans
    assert _num_remat_regions(jax.grad(loss), active_params) == (0 if remat == "none" else 1)
    got = jax.jit(jax.grad(loss))(active_params)
    for a, b in zip(jax.tree.leaves(grads_without_remat), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_apply_rejects_mismatched_params(fns, params):
    bad = {**params, "extra": {"kernel": jnp.zeros(3)}}
    with pytest.raises(ValueError, match="unknown"):
        fns.apply(bad, *_args(_inputs()))


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts(name):
    cd = config_lib.default_configdict()
    apply_preset(cd.model, name)
    cd.model.latent_channels = COUNT_ASSUMPTIONS["latent_channels"]
    cd.model.freq_dim = COUNT_ASSUMPTIONS["freq_dim"]
    cd.model.text.vocab_size = COUNT_ASSUMPTIONS["text.vocab_size"]
    cfg = config_lib.from_configdict(cd)
    config_lib.validate(cfg)
    assert cfg.model.preset == name
    assert count_params(make_model(cfg.model).abstract_params()) == PARAM_COUNTS[name]


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="one of tiny, S"):
        apply_preset(config_lib.default_configdict().model, "M")


def test_validate_refuses_heads_not_divisible_by_tensor():
    cfg = config_lib.replace(config_lib.Config(), **{"mesh.data": -1, "mesh.tensor": 4, "model.num_heads": 2})
    with pytest.raises(config_lib.ConfigError, match=r"model.num_heads=2 is not divisible by mesh.tensor=4"):
        config_lib.validate(cfg, num_devices=8)
