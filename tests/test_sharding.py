"""Tests of the mesh, the logical-axis rules (golden partition specs of the S preset),
sharded initialization, and a forward pass on the mesh equal to the unsharded one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.nnx import traversals
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import names, sharding
from audiodiff_jax.core.config import MeshConfig, ModelConfig
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.model import make_model
from audiodiff_jax.model.presets import PRESETS, apply_preset

MESH_2x2x1x2 = MeshConfig(data=2, fsdp=2, sequence=1, tensor=2)

# Every parameter of the S preset on data=2, fsdp=2, sequence=1, tensor=2; "*" stands for
# any block / text-layer index. FSDP shards model width, tensor shards heads and MLP units.
GOLDEN_S = {
    "blocks/*/cross_attn/k_norm/scale": (None,),
    "blocks/*/cross_attn/key": ("fsdp", "tensor", None),
    "blocks/*/cross_attn/out": ("tensor", None, "fsdp"),
    "blocks/*/cross_attn/q_norm/scale": (None,),
    "blocks/*/cross_attn/query": ("fsdp", "tensor", None),
    "blocks/*/cross_attn/value": ("fsdp", "tensor", None),
    "blocks/*/cross_norm/bias": (None,),
    "blocks/*/cross_norm/scale": (None,),
    "blocks/*/mlp/fc1/bias": ("tensor",),
    "blocks/*/mlp/fc1/kernel": ("fsdp", "tensor"),
    "blocks/*/mlp/fc2/bias": ("fsdp",),
    "blocks/*/mlp/fc2/kernel": ("tensor", "fsdp"),
    "blocks/*/modulation/bias": (None,),
    "blocks/*/modulation/kernel": ("fsdp", None),
    "blocks/*/self_attn/k_norm/scale": (None,),
    "blocks/*/self_attn/key": ("fsdp", "tensor", None),
    "blocks/*/self_attn/out": ("tensor", None, "fsdp"),
    "blocks/*/self_attn/q_norm/scale": (None,),
    "blocks/*/self_attn/query": ("fsdp", "tensor", None),
    "blocks/*/self_attn/value": ("fsdp", "tensor", None),
    "final_layer/linear/bias": (None,),
    "final_layer/linear/kernel": ("fsdp", None),
    "final_layer/modulation/bias": (None,),
    "final_layer/modulation/kernel": ("fsdp", None),
    "start_embedder/fc1/bias": ("fsdp",),
    "start_embedder/fc1/kernel": (None, "fsdp"),
    "start_embedder/fc2/bias": ("fsdp",),
    "start_embedder/fc2/kernel": ("fsdp", None),
    "t_embedder/fc1/bias": ("fsdp",),
    "t_embedder/fc1/kernel": (None, "fsdp"),
    "t_embedder/fc2/bias": ("fsdp",),
    "t_embedder/fc2/kernel": ("fsdp", None),
    "text_encoder/final_norm/bias": (None,),
    "text_encoder/final_norm/scale": (None,),
    "text_encoder/layers/*/attn/k_norm/scale": (None,),
    "text_encoder/layers/*/attn/key": ("fsdp", "tensor", None),
    "text_encoder/layers/*/attn/out": ("tensor", None, "fsdp"),
    "text_encoder/layers/*/attn/q_norm/scale": (None,),
    "text_encoder/layers/*/attn/query": ("fsdp", "tensor", None),
    "text_encoder/layers/*/attn/value": ("fsdp", "tensor", None),
    "text_encoder/layers/*/mlp/fc1/bias": ("tensor",),
    "text_encoder/layers/*/mlp/fc1/kernel": ("fsdp", "tensor"),
    "text_encoder/layers/*/mlp/fc2/bias": ("fsdp",),
    "text_encoder/layers/*/mlp/fc2/kernel": ("tensor", "fsdp"),
    "text_encoder/layers/*/norm1/bias": (None,),
    "text_encoder/layers/*/norm1/scale": (None,),
    "text_encoder/layers/*/norm2/bias": (None,),
    "text_encoder/layers/*/norm2/scale": (None,),
    "text_encoder/proj/bias": ("fsdp",),
    "text_encoder/proj/kernel": ("fsdp", None),
    "text_encoder/token_embedding": (None, "fsdp"),
    "total_embedder/fc1/bias": ("fsdp",),
    "total_embedder/fc1/kernel": (None, "fsdp"),
    "total_embedder/fc2/bias": ("fsdp",),
    "total_embedder/fc2/kernel": ("fsdp", None),
    "x_embedder/bias": ("fsdp",),
    "x_embedder/kernel": (None, "fsdp"),
}


def _pattern(path: tuple[str, ...]) -> str:
    key = "/".join(path)
    key = re.sub(r"^blocks/\d+/", "blocks/*/", key)
    return re.sub(r"^text_encoder/layers/\d+/", "text_encoder/layers/*/", key)


def test_golden_partition_specs_of_S():
    cd = config_lib.default_configdict()
    apply_preset(cd.model, "S")
    cfg = config_lib.from_configdict(cd).model
    mesh = sharding.make_mesh(MESH_2x2x1x2)
    flat = traversals.flatten_mapping(sharding.named_shardings(make_model(cfg).logical_axes(), mesh))
    seen = set()
    for path, s in flat.items():
        pattern = _pattern(path)
        assert pattern in GOLDEN_S, f"parameter {'/'.join(path)} is not in the golden table"
        assert tuple(s.spec) == GOLDEN_S[pattern], "/".join(path)
        assert s.mesh is mesh
        seen.add(pattern)
    assert seen == set(GOLDEN_S)
    assert {p[1] for p in flat if p[0] == "blocks"} == {str(i) for i in range(PRESETS["S"].depth)}
    per_block = sum(k.startswith("blocks/*/") for k in GOLDEN_S)
    per_text_layer = sum(k.startswith("text_encoder/layers/*/") for k in GOLDEN_S)
    once = len(GOLDEN_S) - per_block - per_text_layer
    assert len(flat) == once + per_block * PRESETS["S"].depth + per_text_layer * PRESETS["S"].text_depth


def test_logical_to_spec():
    spec = sharding.logical_to_spec((names.BATCH, names.LENGTH, names.ACT_EMBED))
    assert spec == P(("data", "fsdp"), "sequence", None)
    # a mesh axis shards one dim only: the second "embed" stays replicated
    assert sharding.logical_to_spec((names.EMBED, names.EMBED)) == P("fsdp", None)
    # batch uses fsdp, so a later embed dim cannot
    assert sharding.logical_to_spec((names.BATCH, names.EMBED)) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec((None, names.HEADS)) == P(None, "tensor")
    with pytest.raises(KeyError, match="'nope'"):
        sharding.logical_to_spec(("nope",))


def test_every_logical_name_has_a_rule():
    logical = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str) and "/" not in v}
    assert logical == {name for name, _ in sharding.LOGICAL_RULES}
    for _, axes in sharding.LOGICAL_RULES:
        for a in (axes,) if isinstance(axes, str) else axes or ():
            assert a in names.MESH_AXES


def test_make_mesh_resolves_minus_one():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, sequence=1, tensor=2))
    assert mesh.axis_names == names.MESH_AXES
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_errors_name_the_field():
    with pytest.raises(config_lib.ConfigError, match="mesh"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=1, sequence=1, tensor=1))
    with pytest.raises(config_lib.ConfigError, match="mesh.dcn_"):
        sharding.make_mesh(MeshConfig(data=-1, dcn_data=3))


def test_multislice_mesh_is_slice_major():
    devices = jax.devices()
    # two "slices" of 4 consecutive fake devices, data across slices (DCN)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, sequence=1, tensor=2, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    assert {d.id for d in mesh.devices[0].flat} == {0, 1, 2, 3}
    assert {d.id for d in mesh.devices[1].flat} == {4, 5, 6, 7}
    # fsdp over DCN x ICI: the first two fsdp positions in slice 0, the next two in slice 1
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, sequence=1, tensor=2, dcn_fsdp=2), devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 2}
    slice_of = np.vectorize(lambda d: d.id // 4)(mesh.devices[0, :, 0, :])
    np.testing.assert_array_equal(slice_of, [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_batch_sharding():
    mesh = sharding.make_mesh(MESH_2x2x1x2)
    s = sharding.batch_sharding(mesh)
    assert s.spec == P(("data", "fsdp"))
    x = jax.device_put(np.zeros((8, 3, 5), np.float32), s)
    assert x.addressable_shards[0].data.shape == (2, 3, 5)


def test_constrain_is_a_noop_without_mesh_and_pins_with_one():
    x = jnp.ones((4, 8, 16))
    f = lambda x: sharding.constrain(x * 2, (names.BATCH, names.LENGTH, names.ACT_EMBED))
    assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x))
    with jax.set_mesh(sharding.make_mesh(MESH_2x2x1x2)):
        jaxpr = str(jax.make_jaxpr(f)(x))
        y = jax.jit(f)(x)
    assert "sharding_constraint" in jaxpr and "P(('data', 'fsdp'), 'sequence', None)" in jaxpr
    mesh = sharding.make_mesh(MESH_2x2x1x2)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "sequence", None)), 3)


def _randomize_zeros(params, seed=7, scale=0.05):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        scale * jax.random.normal(k, p.shape, p.dtype) if not np.any(np.asarray(p)) else p
        for k, p in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def test_sharded_init_and_forward_match_unsharded():
    cfg = ModelConfig()  # tiny
    fns = make_model(cfg)
    mesh = sharding.make_mesh(MESH_2x2x1x2)
    shardings = sharding.named_shardings(fns.logical_axes(), mesh)
    params = jax.jit(fns.init, out_shardings=shardings)(jax.random.key(0))
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert p.sharding.is_equivalent_to(s, p.ndim)
    kernel = params["blocks"]["0"]["mlp"]["fc1"]["kernel"]  # [64, 256] over (fsdp, tensor)
    assert kernel.addressable_shards[0].data.shape == (32, 128)
    # same values as an unsharded init
    plain = jax.jit(fns.init)(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    plain = _randomize_zeros(plain)
    params = jax.device_put(plain, shardings)
    b, t, length = 4, 16, 8
    ks = jax.random.split(jax.random.key(1), 3)
    inputs = (
        jax.random.normal(ks[0], (b, t, cfg.latent_channels)),
        jax.random.uniform(ks[1], (b,)),
        jax.random.randint(ks[2], (b, length), 0, cfg.text.vocab_size).at[:, 0].set(3),
        jnp.zeros((b,)),
        jnp.full((b,), 30.0),
        jnp.array([16, 12, 9, 16], jnp.int32),
    )
    inputs = (inputs[0], inputs[1], Conditioning(*inputs[2:]))
    expected = jax.jit(fns.apply)(plain, *inputs)
    batch_s = sharding.batch_sharding(mesh)
    sharded_inputs = jax.tree.map(lambda x: jax.device_put(x, batch_s), inputs)
    with jax.set_mesh(mesh):
        apply = jax.jit(fns.apply)
        assert "sharding_constraint" in str(jax.make_jaxpr(fns.apply)(params, *sharded_inputs))
        out = apply(params, *sharded_inputs)
    assert isinstance(out.sharding, NamedSharding)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(expected).mean()) > 1e-3


@pytest.mark.slow
def test_splash_model_compiles_for_a_tpu_topology():
    """Ahead-of-time: the loss gradient with splash attention, sharded on a v5p:2x2x1 mesh,
    lowers (Pallas kernels inside shard_map) and compiles for TPU on this CPU machine."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    except Exception as e:  # no libtpu
        pytest.skip(f"no TPU topology available: {e}")
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, sequence=1, tensor=1), devices)
    cfg = ModelConfig(attention="splash", dtype="bfloat16", width=128, num_heads=2)
    fns = make_model(cfg)
    param_s = sharding.named_shardings(fns.logical_axes(), mesh)
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), fns.abstract_params(), param_s
    )
    batch_s = sharding.batch_sharding(mesh)
    b, t, length = 4, 256, 32  # frames a multiple of 128: self-attention runs in splash
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_s)
    args = (
        sds((b, t, cfg.latent_channels), jnp.float32),
        sds((b,), jnp.float32),
        sds((b, length), jnp.int32),
        sds((b,), jnp.float32),
        sds((b,), jnp.float32),
        sds((b,), jnp.int32),
    )

    def loss(p, x, t, *cond):
        return jnp.mean((fns.apply(p, x, t, Conditioning(*cond)) - x) ** 2)

    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss)).trace(params, *args).lower(lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()
        compiled = lowered.compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
