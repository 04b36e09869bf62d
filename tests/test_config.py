"""Config conversion and validation: bad configs fail early, naming the field."""

import dataclasses
import json

import pytest
from ml_collections import config_flags  # noqa: F401  (the config files are loaded like the CLI does)

from audiodiff_jax.codec import config as codec_config
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core.config import ConfigError
from audiodiff_jax.diffusion import samplers
from audiodiff_jax.model import presets


def _load(name, arg=None):
    import importlib

    mod = importlib.import_module(f"configs.{name}")
    return mod.get_config(arg)


def test_defaults_round_trip_through_configdict_and_json():
    cfg = config_lib.from_configdict(config_lib.default_configdict())
    assert cfg == config_lib.Config()
    assert config_lib.from_json(config_lib.to_json(cfg)) == cfg


def test_unknown_key_is_named():
    cd = config_lib.default_configdict()
    d = cd.to_dict()
    d["model"]["widht"] = 3
    with pytest.raises(ConfigError, match=r"model\.widht"):
        config_lib.from_configdict(d)


def test_missing_key_is_named():
    d = config_lib.default_configdict().to_dict()
    del d["optim"]["ema_decay"]
    with pytest.raises(ConfigError, match=r"missing config key\(s\): optim\.ema_decay"):
        config_lib.from_configdict(d)


def test_wrong_type_is_named():
    d = config_lib.default_configdict().to_dict()
    d["train"]["num_steps"] = "many"
    with pytest.raises(ConfigError, match=r"train\.num_steps"):
        config_lib.from_configdict(d)


def _cfg(**changes):
    return config_lib.replace(config_lib.Config(), **changes)


@pytest.mark.parametrize(
    "changes,devices,pattern",
    [
        (
            {"model.num_heads": 6, "model.width": 96, "mesh.tensor": 4, "mesh.data": 2},
            8,
            r"model\.num_heads=6.*mesh\.tensor=4",
        ),
        ({"data.global_batch_size": 6, "mesh.data": -1}, 8, r"data\.global_batch_size=6.*8"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, 8, r"at most one mesh axis may be -1"),
        ({"mesh.data": 3}, 8, r"use 3 devices per slice but 8"),
        ({"mesh.data": -1, "mesh.tensor": 3}, 8, r"do not divide"),
        (
            {"data.window_frames": 30, "mesh.data": 2, "mesh.sequence": 4, "data.global_batch_size": 2},
            8,
            r"data\.window_frames=30.*mesh\.sequence=4",
        ),
        ({"model.attention": "flash"}, None, r"model\.attention='flash'"),
        (
            {"model.width": 60, "model.num_heads": 8},
            None,
            r"model\.width=60 is not divisible by model\.num_heads=8",
        ),
        ({"mesh.dcn_data": 3}, 8, r"cannot form 3 slices"),
    ],
)
def test_validate_names_the_field(changes, devices, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_lib.validate(_cfg(**changes), num_devices=devices)


def test_resolve_mesh_with_slices():
    cfg = _cfg(**{"mesh.data": 1, "mesh.fsdp": -1, "mesh.dcn_data": 2})
    assert config_lib.resolve_mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}


@pytest.mark.parametrize(
    "name,arg,devices",
    [("tiny", None, 8), ("demo", None, 1), ("dit", "S", 128), ("dit", "1B", 64), ("dit", "3B", 128)],
)
def test_config_files_load_and_validate(name, arg, devices):
    cfg = config_lib.from_configdict(_load(name, arg))
    config_lib.validate(cfg, num_devices=devices)
    json.loads(config_lib.to_json(cfg))


@pytest.mark.parametrize("arg", [None, *presets.PRESETS])
def test_dit_presets_train_with_masked_context(arg):
    """configs/dit.py turns masked context on (long songs, continuation, inpainting), and a
    checkpoint written with it reads it back on."""
    cfg = config_lib.from_configdict(_load("dit", arg))
    assert cfg.model.masked_context is True
    assert 0.0 < cfg.diffusion.context_none_prob < 1.0  # some rows still train without context
    assert config_lib.from_json(config_lib.to_json(cfg)).model.masked_context is True


def test_config_saved_before_masked_context_reads_it_off():
    """A checkpoint's config from before model.masked_context existed keeps the model it
    trained (no context input), even though configs/dit.py now turns it on."""
    saved = json.loads(config_lib.to_json(config_lib.from_configdict(_load("dit", "S"))))
    del saved["model"]["masked_context"]
    del saved["diffusion"]["context_none_prob"]
    cfg = config_lib.from_json(json.dumps(saved))
    assert cfg.model.masked_context is False
    assert cfg.diffusion.context_none_prob == config_lib.DiffusionConfig().context_none_prob
    assert cfg.model.width == presets.PRESETS["S"].width  # the rest is as saved


def test_sample_section_round_trips_through_configdict_and_json():
    cd = config_lib.default_configdict()
    cd.sample.seconds = (30, 60.5)  # ints are taken as floats
    cd.sample.samplers = ("ddim", "heun")
    cd.sample.seeds = [3, 4]  # a list (as --config.sample.seeds or JSON give) is taken as a tuple
    cd.sample.use_ema = False
    cfg = config_lib.from_configdict(cd)
    assert cfg.sample.seconds == (30.0, 60.5) and cfg.sample.samplers == ("ddim", "heun")
    # The older sample.use_ema (removed) is read as sample.weights.
    assert cfg.sample.seeds == (3, 4) and cfg.sample.weights == ("raw",)
    assert config_lib.from_json(config_lib.to_json(cfg)) == cfg
    assert json.loads(config_lib.to_json(cfg))["sample"]["seeds"] == [3, 4]


def test_unknown_sample_key_is_named():
    d = config_lib.default_configdict().to_dict()
    d["sample"]["sampler"] = "ddim"  # the field is `samplers`
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): sample\.sampler;.*samplers"):
        config_lib.from_configdict(d)


def test_sample_value_of_wrong_type_is_named():
    d = config_lib.default_configdict().to_dict()
    d["sample"]["steps"] = [50, "many"]
    with pytest.raises(ConfigError, match=r"sample\.steps\[1\]='many' must be of type int"):
        config_lib.from_configdict(d)
    d["sample"]["steps"] = 50
    with pytest.raises(ConfigError, match=r"sample\.steps=50 must be a tuple"):
        config_lib.from_configdict(d)


def test_config_saved_before_the_sample_section_gets_its_defaults():
    """Checkpoints written before the sample section existed still load (sampling reads them)."""
    saved = json.loads(config_lib.to_json(config_lib.Config()))
    del saved["sample"]
    assert config_lib.from_json(json.dumps(saved)).sample == config_lib.SampleConfig()


def test_config_saved_before_the_profile_section_gets_its_defaults():
    """DiT and codec configs saved before the profile section existed still load, with
    no profile asked for (``profile.start_step=0``)."""
    saved = json.loads(config_lib.to_json(config_lib.Config()))
    del saved["profile"]
    assert config_lib.from_json(json.dumps(saved)).profile == config_lib.ProfileConfig()
    assert config_lib.ProfileConfig().start_step == 0
    codec_saved = json.loads(codec_config.to_json(codec_config.CodecConfig()))
    del codec_saved["profile"]
    assert codec_config.from_configdict(codec_saved).profile == config_lib.ProfileConfig()


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"profile.num_steps": 0}, r"profile\.num_steps=0 must be >= 1"),
        ({"profile.start_step": -2}, r"profile\.start_step=-2 must be >= 0"),
        ({"profile.hosts": "some"}, r"profile\.hosts='some'; one of \('first', 'all'\)"),
    ],
)
def test_bad_profile_field_is_named(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_lib.validate(_cfg(**changes))


@pytest.mark.parametrize(
    "changes,pattern",
    [
        (
            {"sample.samplers": ("dpmpp_2m", "typo")},
            r"sample\.samplers=dpmpp_2m,typo: 'typo' is not a sampler",
        ),
        ({"sample.steps": (0,)}, r"sample\.steps=0: 0 must be an integer in \[1, 10000\]"),
        ({"sample.steps": ()}, r"sample\.steps is empty"),
        ({"sample.schedule": ("cosine",)}, r"sample\.schedule=cosine: 'cosine' is not a schedule"),
        ({"sample.weights": ("ema", "best")}, r"sample\.weights=ema,best: 'best' is not a weight set"),
        ({"optim.extra_ema_decays": (0.999,)}, r"optim\.extra_ema_decays=0.999 repeats a decay"),
        ({"sample.guidance": (-1.0,)}, r"sample\.guidance=-1.0: -1.0 must be finite and >= 0"),
        ({"sample.seconds": (400.0,)}, r"sample\.seconds=400.0: 400.0 is out of range \[10, 300\]"),
        ({"sample.min_seconds": 20.0, "sample.max_seconds": 15.0}, r"sample\.min_seconds=20.0 is above"),
        (
            {"sample.window_frames": 32, "sample.overlap_frames": 32},
            r"sample\.overlap_frames=32 must be below",
        ),
        ({"sample.strength": 0.0}, r"sample\.strength=0.0 must be in \(0, 1\]"),
    ],
)
def test_validate_names_the_sample_field(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_lib.validate(_cfg(**changes))


def test_sampler_and_schedule_names_are_the_ones_sampling_implements():
    assert set(samplers.EVALS_PER_STEP) == set(config_lib.SAMPLERS)
    for schedule in config_lib.SCHEDULES:  # each one builds a grid from 1 down to 0
        grid = samplers.time_grid(4, schedule=schedule)
        assert grid[0] == 1.0 and grid[-1] == 0.0


def test_every_sample_field_has_help_and_a_valid_default():
    for f in dataclasses.fields(config_lib.SampleConfig):
        assert f.metadata.get("help"), f.name
    config_lib.validate_sample(config_lib.SampleConfig())
