"""Device memory in the metrics and out-of-memory errors that say what to change.

The training loop runs here with a small stand-in trainer (a jitted step over a few
arrays), so each run takes a second: device memory figures are written where the
backend reports them and are absent (not zero) where it does not; an out-of-memory
error at compile time or at run time ends in one line naming the fields to change.
The real program's run (``tests/test_profile.py``) checks the CPU backend's side, and
``tests/test_aot.py`` the ahead-of-time compiler's.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import memory, names
from audiodiff_jax.training import loop

ADVICE = "data.global_batch_size=8 (fewer rows per step)"
# XLA's words, as each backend states them.
TPU_COMPILE_OOM = (
    "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
    "required for HLO temporaries (96.96G) exceeds available HBM (15.75G). HLO module: jit_train_step."
)
GPU_RUN_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3221225472 bytes."


class FakeDevice:
    def __init__(self, device_id, stats):
        self.id, self._stats = device_id, stats

    def memory_stats(self):
        return self._stats


class StandInTrainer:
    """The loop's Trainer protocol over a state of two arrays; fails where told to."""

    def __init__(self, fail_compile: str = "", fail_step: str = "", fail_at: int = 0):
        self.mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
        self.fail_compile, self.fail_step, self.fail_at = fail_compile, fail_step, fail_at
        self.calls = 0

        def step(state, batch):
            w = state["w"] * 0.5 + batch
            return {"step": state["step"] + 1, "w": w}, {names.TRAIN_LOSS: jnp.sum(w * w)}

        self._step = jax.jit(step, donate_argnums=(0,))

    def abstract_state(self):
        return jax.eval_shape(self.initial_state)

    def initial_state(self):
        return {"step": jnp.zeros((), jnp.int32), "w": jnp.ones((4,), jnp.float32)}

    def state_step(self, state):
        return int(state["step"])

    def step(self, state, batch):
        self.calls += 1
        if self.fail_step and self.calls == self.fail_at:
            raise jax.errors.JaxRuntimeError(self.fail_step)
        return self._step(state, batch)

    def compile(self, state, batch):
        if self.fail_compile:
            raise jax.errors.JaxRuntimeError(self.fail_compile)
        return self._step.lower(state, batch).compile()

    def memory_advice(self):
        return ADVICE

    def perf_scalars(self, seconds_per_step):
        return {}


def _run(trainer, workdir, num_steps=2):
    cfg = loop.LoopConfig(num_steps=num_steps, log_every=1, save_every=1000, keep_last=1)
    return loop.run(trainer, lambda step: jnp.full((4,), 0.1, jnp.float32), str(workdir), cfg, json_items={})


def _scalar_rows(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r for r in rows if "scalars" in r]


@pytest.mark.parametrize("reported", [False, True])
def test_device_memory_is_logged_only_where_the_backend_reports_it(tmp_path, monkeypatch, reported):
    stats = [
        {"bytes_in_use": 3 * 2**20, "peak_bytes_in_use": 5 * 2**20, "bytes_limit": 16 * 2**30},
        {"bytes_in_use": 4 * 2**20, "peak_bytes_in_use": 6 * 2**20, "bytes_limit": 16 * 2**30},
    ]
    devices = [FakeDevice(i, s if reported else None) for i, s in enumerate(stats)]
    monkeypatch.setattr(memory, "_local_devices", lambda: devices)
    _run(StandInTrainer(), tmp_path)
    rows = _scalar_rows(tmp_path)
    logged = [r["scalars"] for r in rows if names.TRAIN_LOSS in r["scalars"]]
    assert [r["step"] for r in rows if names.TRAIN_LOSS in r["scalars"]] == [1, 2]
    for scalars in logged:
        mem = {k: v for k, v in scalars.items() if k.startswith("memory/")}
        if not reported:
            assert mem == {}  # absent, never zero
            continue
        assert mem == {
            names.MEMORY_IN_USE.format(0): 3 * 2**20,
            names.MEMORY_IN_USE.format(1): 4 * 2**20,
            names.MEMORY_PEAK.format(0): 5 * 2**20,
            names.MEMORY_PEAK.format(1): 6 * 2**20,
            names.MEMORY_IN_USE_MAX: 4 * 2**20,
            names.MEMORY_PEAK_MAX: 6 * 2**20,
            names.MEMORY_LIMIT: 16 * 2**30,
        }
    # The compiled step's own analysis, once, before the first step (every backend has it).
    (compiled,) = [r for r in rows if names.COMPILED_TOTAL in r["scalars"]]
    # Arguments: the state (four float32 weights, an int32 step) and the batch (four float32).
    assert compiled["step"] == 0 and compiled["scalars"][names.COMPILED_ARGUMENTS] == 16 + 4 + 16


def test_device_without_some_statistics_gives_only_those_it_has():
    partial = FakeDevice(7, {"bytes_in_use": 10})  # no peak, no limit
    assert memory.device_scalars([partial, FakeDevice(8, None)]) == {
        names.MEMORY_IN_USE.format(7): 10.0,
        names.MEMORY_IN_USE_MAX: 10.0,
    }
    assert memory.device_capacity([partial]) is None


def test_out_of_memory_compiling_the_step_is_one_line_naming_the_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "_local_devices", lambda: [])
    with pytest.raises(memory.OutOfMemory) as info:
        _run(StandInTrainer(fail_compile=TPU_COMPILE_OOM), tmp_path)
    text = str(info.value)
    assert "\n" not in text
    assert text == (
        "out of device memory compiling the train step: it needs 96.96 GiB per device (HLO temporaries), "
        f"the device has 15.75 GiB; to fit, change {ADVICE}"
    )
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)  # kept for -v=1


def test_out_of_memory_in_a_step_gives_the_compiled_size_and_the_device_size(tmp_path, monkeypatch):
    devices = [FakeDevice(0, {"bytes_in_use": 1, "bytes_limit": 80 * 2**30})]
    monkeypatch.setattr(memory, "_local_devices", lambda: devices)
    with pytest.raises(memory.OutOfMemory) as info:
        _run(StandInTrainer(fail_step=GPU_RUN_OOM, fail_at=3), tmp_path, num_steps=5)
    text = str(info.value)
    assert text.startswith("out of device memory running the train step near step 2: the program needs ")
    assert "and failed allocating 3.00 GiB more, the device has 80.00 GiB; to fit, change " + ADVICE in text
    assert "\n" not in text


def test_out_of_memory_restoring_a_checkpoint_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A state too big for the devices is not a damaged checkpoint: nothing is set aside."""
    monkeypatch.setattr(memory, "_local_devices", lambda: [])
    _run(StandInTrainer(), tmp_path)  # saves step 2

    def no_room():  # the restore target's arrays cannot be allocated
        raise jax.errors.JaxRuntimeError(GPU_RUN_OOM)

    too_big = StandInTrainer()
    too_big.abstract_state = no_room
    with pytest.raises(memory.OutOfMemory, match=r"^out of device memory creating the train state: "):
        _run(too_big, tmp_path, num_steps=4)
    assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / "checkpoints.unreadable").exists()


@pytest.mark.parametrize(
    "message,wanted,has,what",
    [
        (TPU_COMPILE_OOM, int(96.96 * 2**30), int(15.75 * 2**30), "HLO temporaries"),
        ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm.",
         int(20.5 * 2**30), int(15.48 * 2**30), "hbm in use"),
        (GPU_RUN_OOM, 3 * 2**30, None, "one allocation"),
        ("RESOURCE_EXHAUSTED: something else", None, None, ""),
    ],
)  # fmt: skip
def test_sizes_are_read_from_each_backends_message(message, wanted, has, what):
    assert memory.is_out_of_memory(message)
    assert memory.reported_sizes(message) == (wanted, has, what)


def test_the_dit_names_its_memory_fields_with_their_values():
    cfg = config_lib.replace(config_lib.Config(), **{"data.global_batch_size": 64, "model.remat": "none"})
    advice = memory.config_advice(cfg, config_lib.MEMORY_FIELDS)
    assert advice.startswith("data.global_batch_size=64 (fewer rows per step), data.window_frames=64 ")
    assert "model.remat='none' (" in advice and "mesh.fsdp=1 (" in advice
