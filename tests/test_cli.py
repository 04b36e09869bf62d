"""``--help`` of every program: exit 0 and the program's own flags (audiodiff_jax/programs/cli.py).

The console scripts come from the installed distribution's entry points, so a script
added to setup.py is covered once the package is reinstalled; so are the modules run
with ``python -m`` (launchers, corpus renderers) that call ``cli.run``. A program's flags
are read from the source of the modules its ``cli.run`` names (every
``DEFINE_*("name", ...)``), so a new flag is checked too. All programs run at once: each
only imports its modules and prints.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_side_by_side, write_shards

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT_S = 120

PACKAGES = ("audiodiff_jax", "data_pipeline", "launch")
_DEFINE = re.compile(r"\bDEFINE_\w+\(\s*\"(\w+)\"")
_CLI_RUN = re.compile(r"\bcli\.run\((.*?)\)\n", re.DOTALL)


def console_scripts() -> dict[str, str]:
    """Script name -> module, from the installed distribution's entry points."""
    eps = importlib.metadata.distribution("audiodiff-jax").entry_points
    return {ep.name: ep.module for ep in eps if ep.group == "console_scripts"}


def _source(module: str) -> str:
    return (ROOT / (module.replace(".", "/") + ".py")).read_text()


def module_programs() -> list[str]:
    """Modules run with ``python -m`` (a ``__main__`` block that calls ``cli.run``), scripts' aside."""
    scripts = set(console_scripts().values())
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            text = path.read_text()
            if module not in scripts and "cli.run(" in text and '__name__ == "__main__"' in text:
                found.append(module)
    return found


def flag_modules(module: str) -> tuple[str, ...]:
    """``module`` and the other modules its ``cli.run(...)`` call names (whose flags it lists)."""
    call = _CLI_RUN.search(_source(module))
    assert call, f"{module} does not call cli.run"
    return (module, *re.findall(r"\"([\w.]+)\"", call.group(1)))


def defined_flags(module: str) -> list[str]:
    """The flag names a module defines with a literal name (read from its source)."""
    return _DEFINE.findall(_source(module))


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    return run_side_by_side(commands, cwd=ROOT, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def helps():
    """(name, modules) -> finished ``--help`` run, for every program."""
    programs = {
        (name, flag_modules(module)): [str(BIN / name), "--help"]
        for name, module in console_scripts().items()
    }
    assert len(programs) >= 9, programs  # setup.py declares at least nine console scripts
    launchers = module_programs()
    assert "launch.local" in launchers, launchers
    for module in launchers:
        programs[(f"python -m {module}", flag_modules(module))] = [sys.executable, "-m", module, "--help"]
    programs[("--helpfull", ("audiodiff_jax.programs.train_main",))] = [
        str(BIN / "audiodiff-train"),
        "--helpfull",
    ]
    return _run_all(programs)


def test_help_lists_the_programs_own_flags(helps):
    for (name, modules), result in helps.items():
        if name == "--helpfull":
            continue
        text = result.stdout
        assert result.returncode == 0, f"{name} --help: exit {result.returncode}\n{result.stderr[-3000:]}"
        assert text.startswith(f"USAGE: {name} "), f"{name} --help:\n{text[:500]}"
        expected = [flag for module in modules for flag in defined_flags(module)]
        assert expected, f"{name}: no flags found in the source of {modules}"
        missing = [f for f in expected if not re.search(rf"^  --(\[no\])?{f}:", text, re.MULTILINE)]
        assert not missing, f"{name} --help lacks {missing}:\n{text}"
        assert "Try --helpfull" in text


def test_config_flag_help_mentions_overrides(helps):
    text = helps[("audiodiff-train", ("audiodiff_jax.programs.train_main",))].stdout
    assert "--config.FIELD=VALUE" in text


def test_helpfull_exits_0_and_lists_every_flag(helps):
    result = helps[("--helpfull", ("audiodiff_jax.programs.train_main",))]
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--workdir:", "--config:", "--[no]helpfull:", "--[no]logtostderr:"):
        assert flag in result.stdout, flag


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    shards = write_shards(str(tmp_path / "shards"))
    """Mistakes a user makes end in one line naming the field or file, exit 2, no traceback;
    a config is found by name from any directory."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    train = str(Path(sys.executable).parent / "audiodiff-train")
    cases = {
        "typo": (
            ["--config=tiny", "--config.model.typo=1"],
            "--config.model.typo=1: the config has no field 'typo'",
        ),
        "bad value": (["--config=tiny", "--config.model.width=abc"], "--config.model.width=abc"),
        "no config file": (["--config=/nonexistent/cfg.py"], "no config file '/nonexistent/cfg.py'"),
        "no shards": (
            ["--config=configs/tiny.py", f"--config.data.shards_dir={tmp_path / 'empty'}"],
            "dataset_card.json: no dataset card",
        ),
        "unknown flag": (["--config=tiny", "--bogus=1"], "Unknown command line flag 'bogus'"),
        "workdir is a file": (
            ["--config=tiny", f"--config.data.shards_dir={shards}", f"--workdir={tmp_path / 'a_file'}"],
            "is a file, not a folder",
        ),
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {
        name: subprocess.Popen(
            [
                train,
                *([] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path / 'w'}"]),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,  # not the repository: configs/... and names resolve from the package
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        want = cases[name][1]
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err[-2000:]}"
        lines = [line for line in err.splitlines() if line.startswith("audiodiff-train: error: ")]
        assert len(lines) == 1 and want in lines[0], f"{name}:\n{err[-2000:]}"
        assert "Traceback" not in err, f"{name}:\n{err[-2000:]}"
