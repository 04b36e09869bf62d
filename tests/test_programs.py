"""The training programs (audiodiff_jax/programs/train_main.py): one module serves the DiT
(``audiodiff-train``) and the codec (``audiodiff-codec-train``), and neither it nor the
trainers load sampling or evaluation (the DiT program imports its evaluator only when the
config turns evaluation on)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO, bin_path, run_side_by_side

TIMEOUT_S = 120
NOT_LOADED = (
    "audiodiff_jax.sampling",
    "audiodiff_jax.sweeps",
    "audiodiff_jax.evaluation",
    "audiodiff_jax.evaluators",
)
_IMPORT_AND_LIST = """
import sys
import audiodiff_jax.programs.train_main
import audiodiff_jax.training.adapter_trainer
import audiodiff_jax.training.codec_trainer
import audiodiff_jax.training.dit_trainer
for name in sorted(sys.modules):
    print(name)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run_all(commands: dict[str, list[str]], cwd: str) -> dict[str, subprocess.CompletedProcess]:
    return run_side_by_side(commands, cwd=cwd, timeout=TIMEOUT_S)


def test_the_training_program_and_trainers_load_no_sampling_or_evaluation():
    """A fresh interpreter imports the program and both trainers: no module of sampling,
    sweeps, evaluation or evaluators comes with them."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_AND_LIST],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = result.stdout.split()
    assert "audiodiff_jax.programs.train_main" in loaded  # the listing is the child's modules
    bad = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in NOT_LOADED)]
    assert not bad, f"importing the training program loads {bad}"


def test_codec_program_help_config_error_and_dit_rejects_codec_flags(tmp_path):
    """``audiodiff-codec-train`` (now served by train_main): --help lists its own flags
    (exit 0); a config error ends in one line naming the field, exit 2; the DiT program
    refuses the codec's --export_dir with one line, exit 2."""
    codec, dit = bin_path("audiodiff-codec-train"), bin_path("audiodiff-train")
    workdir = f"--workdir={tmp_path / 'w'}"
    done = _run_all(
        {
            "help": [codec, "--help"],
            "config error": [codec, workdir, "--config=codec:tiny", "--config.model.kernel_size=4"],
            "dit export": [dit, workdir, "--config=tiny", f"--export_dir={tmp_path / 'e'}"],
        },
        cwd=str(tmp_path),
    )

    helped = done["help"]
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert helped.stdout.startswith("USAGE: audiodiff-codec-train "), helped.stdout[:500]
    for flag in ("config", "workdir", "step_timeout_s", "export_dir", "stats_dir", "coordinator_address"):
        assert f"\n  --{flag}:" in helped.stdout, f"--{flag} missing:\n{helped.stdout}"

    bad = done["config error"]
    assert bad.returncode == 2, f"exit {bad.returncode}\n{bad.stderr[-3000:]}"
    lines = [line for line in bad.stderr.splitlines() if line.startswith("audiodiff-codec-train: ")]
    assert len(lines) == 1 and "config error: model.kernel_size=4" in lines[0], bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr

    refused = done["dit export"]
    assert refused.returncode == 2, f"exit {refused.returncode}\n{refused.stderr[-3000:]}"
    lines = [line for line in refused.stderr.splitlines() if line.startswith("audiodiff-train: ")]
    assert len(lines) == 1 and "--export_dir" in lines[0], refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert not os.path.exists(tmp_path / "w"), "the refused run started training"
