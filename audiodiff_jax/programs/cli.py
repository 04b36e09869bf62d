"""The entry point every program of the project runs through: ``absl.app.run`` with a
``--help`` that describes the program itself.

absl's ``--help`` lists the flags of ``sys.argv[0]``; for a console script that is the
pip wrapper in ``bin/``, which defines none, so it prints only "Try --helpfull" (and
exits 1). ``run`` answers ``--help`` (also ``-h``, ``-?``, ``--helpshort``) before absl
parses anything, with a usage line, the module's docstring and the flags the program's
modules define, and exits 0. ``--helpfull`` lists every flag (absl's full listing), also
with status 0.

Errors a user can fix end in one line and exit status 2 (``errors.EXIT_USER_ERROR``),
with the traceback in the log at ``-v=1``: a bad flag or config override, a config
file that does not exist, and any :class:`~audiodiff_jax.core.errors.UserError` the
program raises (a config field, a shard, a checkpoint...).

Config files are found by path or by name: ``--config=dit:1B`` (or ``dit.py:1B``, or
``configs/dit.py:1B`` from any directory) is the installed ``configs/dit.py``, so every
host of a job resolves the same file whatever its working directory.

    def run():
        cli.run(main, module=__name__)
"""

from __future__ import annotations

import glob
import importlib.util
import inspect
import os
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from audiodiff_jax.core.errors import EXIT_USER_ERROR, UserError
from audiodiff_jax.core.logs import quiet_library_logs

_SHORT_HELP = {"--help", "-help", "-h", "-?", "--helpshort", "-helpshort"}
_FULL_HELP = {"--helpfull", "-helpfull"}


def _help_wanted(argv: Sequence[str]) -> str | None:
    """'short' or 'full' when a help flag comes before ``--``, else None."""
    for arg in argv[1:]:
        if arg == "--":
            return None
        if arg in _SHORT_HELP:
            return "short"
        if arg in _FULL_HELP:
            return "full"
    return None


def _program_name(argv: Sequence[str]) -> str:
    """The bin/ script's name, or ``python -m PKG.MOD`` for a module run with ``-m``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(argv[0])


def _flag_key(module: str) -> str:
    """The name absl files a module's flags under (``sys.argv[0]`` for ``__main__``)."""
    return sys.argv[0] if module == "__main__" else module


def help_text(
    modules: Sequence[str], argv: Sequence[str], *, full: bool = False, usage: str | None = None
) -> str:
    """Usage line, docstring of ``modules[0]`` and the flags of ``modules`` (all flags if ``full``)."""
    parts = [f"USAGE: {_program_name(argv)} {usage or '[flags]'}"]
    doc = getattr(sys.modules.get(modules[0]), "__doc__", None)
    if doc:
        parts.append(inspect.cleandoc(doc))
    if full:
        parts.append("flags:\n" + flags.FLAGS.get_help())
    else:
        listing = [flags.FLAGS.module_help(_flag_key(m)).strip("\n") for m in modules]
        parts.append("flags:\n\n" + "\n\n".join(text for text in listing if text))
        for m in modules:
            for flag in flags.FLAGS.get_key_flags_for_module(_flag_key(m)):
                if config_flags.is_config_flag(flag):
                    parts.append(
                        textwrap.fill(
                            f"Any field of the config loaded by --{flag.name} can be overridden with "
                            f"--{flag.name}.FIELD=VALUE, e.g. --{flag.name}.train.num_steps=100.",
                            80,
                        )
                    )
        parts.append("Try --helpfull to list every flag, absl's own included.")
    return "\n\n".join(parts) + "\n"


def configs_dir() -> str:
    """The folder of the installed ``configs`` package (``configs/*.py``)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return list(spec.submodule_search_locations)[0]


def resolve_config(value: str) -> str:
    """``PATH[:ARG]`` as given when PATH exists; else a name of the installed configs
    (``dit``, ``dit.py`` or ``configs/dit.py``) -> its absolute path, ``:ARG`` kept."""
    path, sep, arg = value.partition(":")
    if os.path.exists(path) or not path:
        return value
    folder, name = os.path.split(path)
    if folder not in ("", "configs"):
        return value
    candidate = os.path.join(configs_dir(), name if name.endswith(".py") else name + ".py")
    return candidate + sep + arg if os.path.isfile(candidate) else value


def _config_flag_names() -> set[str]:
    return {name for name, flag in flags.FLAGS._flags().items() if config_flags.is_config_flag(flag)}


def _resolve_config_args(argv: list[str]) -> list[str]:
    names = _config_flag_names()
    out, i = list(argv), 1
    while i < len(out):
        arg = out[i]
        if arg == "--":
            break
        key, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and key in names:
            if eq:
                out[i] = f"--{key}={resolve_config(value)}"
            elif i + 1 < len(out):
                out[i + 1] = resolve_config(out[i + 1])
                i += 1
        i += 1
    return out


def _installed_names() -> str:
    folder = configs_dir()
    found = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
    return ", ".join(found)


def fail(program: str, message: str, exc: BaseException | None = None) -> None:
    """One line on stderr, the traceback (if any) in the log at -v=1, exit status 2."""
    if exc is not None:
        logging.vlog(1, "%s", "".join(traceback.format_exception(exc)))
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _override_error(argv: list[str], e: Exception) -> str:
    """Names the ``--config.FIELD=VALUE`` override behind a parse error, when one is."""
    key = str(e).strip("\"'")
    prefixes = tuple(f"--{name}." for name in _config_flag_names())
    overrides = [a for a in argv if a.startswith(prefixes)]
    for arg in overrides:
        fields = arg.split("=", 1)[0].split(".")[1:]
        if key in fields:
            return f"{arg}: the config has no field {key!r} there (see the config file for its fields)"
    where = f" in {' '.join(overrides)}" if overrides else ""
    return f"bad config or config override{where}: {type(e).__name__}: {e}"


def _parse(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors (exit 2) for bad flags and configs."""
    program = _program_name(argv)
    argv = _resolve_config_args(argv)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(program, f"{e} (see {program} --help)", e)
    except Exception as e:  # noqa: BLE001 - a config file that fails to load or a bad override
        fail(program, _override_error(argv, e), e)
    for name in _config_flag_names():
        flag = flags.FLAGS[name]
        if not flag.present:
            continue
        path = config_flags.get_config_filename(flag).partition(":")[0]
        if not os.path.isfile(path):
            fail(
                program,
                f"--{name}: no config file {path!r} (give a path, or the name of an installed "
                f"config: {_installed_names()})",
            )
        try:
            flag.value.keys()  # a file that failed to load raises here
        except Exception as e:  # noqa: BLE001 - ml_collections defers load errors to first use
            fail(program, f"--{name}={path}: cannot load ({type(e).__name__}: {e})", e)
    return rest


def _skip_absent_tpu() -> None:
    """Keeps jax from probing for TPU chips on a machine that has none.

    With libtpu installed (for ahead-of-time compiles) jax tries the TPU backend first
    and libtpu prints a screen of errors where there is no chip. When the user chose no
    platform (``JAX_PLATFORMS``) and the machine has no TPU device node, the platforms
    become the GPU (if there is one) and the CPU.
    """
    if os.environ.get("JAX_PLATFORMS") or not importlib.util.find_spec("libtpu"):
        return
    vfio = os.listdir("/dev/vfio") if os.path.isdir("/dev/vfio") else []
    if glob.glob("/dev/accel*") or any(name.isdigit() for name in vfio):  # TPU chips (v4/v5e; v5p/v6e)
        return
    has_gpu = os.path.exists("/dev/nvidiactl") and importlib.util.find_spec("jax_cuda12_plugin") is not None
    platforms = "cuda,cpu" if has_gpu else "cpu"
    if "jax" in sys.modules:  # imported already: its config read the environment then
        sys.modules["jax"].config.update("jax_platforms", platforms)
    else:
        os.environ["JAX_PLATFORMS"] = platforms


def run(
    main: Callable[[list[str]], object],
    *,
    module: str | Sequence[str],
    usage: str | None = None,
) -> None:
    """``absl.app.run(main)``, with ``--help`` describing ``module``'s flags (exit 0).

    Args:
      main: the program, called with the arguments left after the flags.
      module: the name of the module defining the program's flags (pass ``__name__``),
        or several names: the first gives the docstring, all give flags (e.g. a
        program that reuses another module's flags).
      usage: what follows the program name on the usage line (default ``[flags]``).
    """
    modules = [module] if isinstance(module, str) else list(module)

    def parse(argv: list[str]) -> list[str]:
        wanted = _help_wanted(argv)
        if wanted is not None:
            sys.stdout.write(help_text(modules, argv, full=wanted == "full", usage=usage))
            sys.stdout.flush()
            sys.exit(0)
        return _parse(argv)

    def guarded(argv: list[str]):
        quiet_library_logs()
        _skip_absent_tpu()
        try:
            return main(argv)
        except UserError as e:
            fail(_program_name(sys.argv), str(e), e)

    app.run(guarded, flags_parser=parse)
