"""The entry point every program of the project runs through: ``absl.app.run`` with a
``--help`` that describes the program itself.

absl's ``--help`` lists the flags of ``sys.argv[0]``; for a console script that is the
pip wrapper in ``bin/``, which defines none, so it prints only "Try --helpfull" (and
exits 1). ``run`` answers ``--help`` (also ``-h``, ``-?``, ``--helpshort``) before absl
parses anything, with a usage line, the module's docstring and the flags the program's
modules define, and exits 0. ``--helpfull`` lists every flag (absl's full listing), also
with status 0. Everything else is ``app.run`` unchanged.

    def run():
        cli.run(main, module=__name__)
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

from absl import app, flags

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
    from ml_collections.config_flags import config_flags  # here: only --help needs it

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
        return app.parse_flags_with_usage(argv)

    app.run(main, flags_parser=parse)
