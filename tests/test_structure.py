"""The shape of the code base, checked from the source (ast; nothing is imported).

The layout and its floors are described in docs/DESIGN.md ("Layout and dependency
floors"); this file is what holds the code to them.

- The library never imports the pipeline or the launchers: ``data_pipeline`` and
  ``launch`` depend on ``audiodiff_jax``, never the reverse.
- No import cycle between project modules.
- Project modules are imported at module top; an import inside a function is allowed
  only for an optional or heavy dependency, with a comment on the line above (or the
  same line) saying why.
- Every module of ``audiodiff_jax`` lives in one of the packages of :data:`FLOORS`
  (only ``audiodiff_jax/__init__.py`` sits at the root).
- Floors: a module imports only from its own floor or below; at floors 2-4 it imports
  nothing from a sibling package of its floor. Imports inside functions count too: a
  lazy import is still a dependency.
- The packages of floor 1 import each other without a cycle.
- The trainers and the loop (``training.dit_trainer``, ``training.adapter_trainer``,
  ``training.codec_trainer``, ``training.loop``) do not import sampling or evaluation, not even transitively:
  evaluators are handed to the loop by the training program.

Errors list every offending import as ``file:line imports module``.
"""

import ast
import itertools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("audiodiff_jax", "data_pipeline", "launch", "configs")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: pathlib.Path):
    """Yields (imported project module, line, inside a function?) for every import."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = ".".join(path.relative_to(ROOT).with_suffix("").parts)

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    pkg = here.split(".")[: len(here.split(".")) - child.level + (1 if is_pkg else 0)]
                    base = ".".join(pkg + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    yield (sub if sub in MODULES else base), child.lineno, in_function
            else:
                yield from visit(child, inner)

    for name, line, in_function in visit(tree, False):
        if name.split(".")[0] in PACKAGES:
            yield name, line, in_function


IMPORTS = {name: list(_imports(path)) for name, path in MODULES.items()}


def test_the_library_never_imports_the_pipeline_or_the_launchers():
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
        for m, imports in IMPORTS.items()
        if m.startswith("audiodiff_jax")
        for target, line, _ in imports
        if target.split(".")[0] in ("data_pipeline", "launch")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {
        m: sorted({t for t, _, fn in imports if not fn and t in MODULES and t != m})
        for m, imports in IMPORTS.items()
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def dfs(m, path):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                dfs(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            dfs(m, [m])
    assert not cycles, "\n".join(cycles)


def test_project_imports_are_at_module_top_unless_commented():
    bad = []
    for m, imports in IMPORTS.items():
        lines = MODULES[m].read_text().splitlines()
        for target, line, in_function in imports:
            if not in_function:
                continue
            above, same = lines[line - 2].strip(), lines[line - 1]
            if not (above.startswith("#") or "#" in same):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_package_is_seen(pkg):
    assert any(m == pkg or m.startswith(pkg + ".") for m in MODULES)


# -- the library's layout: packages on floors ---------------------------------------

LIBRARY = "audiodiff_jax"
# Package of audiodiff_jax -> floor. A module imports only from its own floor or below;
# at floors 2-4 not from a sibling package of the same floor.
FLOORS = {
    "core": 0,
    "data": 1,
    "model": 1,
    "diffusion": 1,
    "codec": 1,
    "checkpoints": 1,
    "evaluation": 1,
    "training": 2,
    "sampling": 2,
    "sweeps": 3,
    "evaluators": 3,
    "compilation": 3,
    "programs": 4,
}
ROOT_FLOOR = 0  # audiodiff_jax/__init__.py: importable by every floor, imports only core
# What the trainers and their loop must never reach, even through other modules.
TRAINING_ROOTS = (
    "audiodiff_jax.training.dit_trainer",
    "audiodiff_jax.training.adapter_trainer",
    "audiodiff_jax.training.codec_trainer",
    "audiodiff_jax.training.loop",
)
NOT_FROM_TRAINING = ("sampling", "sweeps", "evaluation", "evaluators")


def _package(module: str) -> str | None:
    """``core`` for ``audiodiff_jax.core.config``; "" for the root; None outside the library."""
    parts = module.split(".")
    if parts[0] != LIBRARY:
        return None
    return parts[1] if len(parts) > 1 else ""


def _floor(package: str) -> int | None:
    return ROOT_FLOOR if package == "" else FLOORS.get(package)


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def _library_imports(*, module_level_only: bool):
    """(module, line, imported module) for every import between library modules."""
    for m, imports in IMPORTS.items():
        if _package(m) is None:
            continue
        for target, line, in_function in imports:
            if module_level_only and in_function:
                continue
            if _package(target) is not None:
                yield m, line, target


def test_every_library_module_is_in_a_listed_package():
    bad = []
    for m, path in MODULES.items():
        package = _package(m)
        if package is None or m == LIBRARY:
            continue
        if path.parent == ROOT / LIBRARY:
            bad.append(f"{path.relative_to(ROOT)}: a module at the root of {LIBRARY}")
        elif _floor(package) is None:
            bad.append(f"{path.relative_to(ROOT)}: package {package!r} is not one of {sorted(FLOORS)}")
    assert not bad, "\n".join(bad)


def test_imports_respect_the_floors():
    bad = []
    for m, line, target in _library_imports(module_level_only=False):
        a, b = _package(m), _package(target)
        fa, fb = _floor(a), _floor(b)
        if fb is None:
            bad.append(f"{_where(m, line)} imports {target}, which is in no listed package")
        elif fa is None or a == b:
            continue  # a stray module is reported by the test above
        elif fb > fa:
            bad.append(f"{_where(m, line)} imports {target}: {a} (floor {fa}) reaches up to {b} (floor {fb})")
        elif fa >= 2 and fb == fa:
            bad.append(f"{_where(m, line)} imports {target}: {a} and {b} are siblings on floor {fa}")
    assert not bad, "\n".join(bad)


def test_the_packages_of_floor_1_import_each_other_without_a_cycle():
    edges: dict[str, dict[str, list[str]]] = {}  # package -> package -> "file:line imports x"
    for m, line, target in _library_imports(module_level_only=False):
        a, b = _package(m), _package(target)
        if a != b and _floor(a) == 1 and _floor(b) == 1:
            edges.setdefault(a, {}).setdefault(b, []).append(f"{_where(m, line)} imports {target}")
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def dfs(p, path):
        state[p] = 1
        for q in sorted(edges.get(p, {})):
            if state.get(q) == 1:
                loop = path[path.index(q) :] + [q]
                because = [imp for x, y in itertools.pairwise(loop) for imp in edges[x][y]]
                cycles.append(" -> ".join(loop) + "\n  " + "\n  ".join(because))
            elif q not in state:
                dfs(q, path + [q])
        state[p] = 2

    for p in sorted(edges):
        if p not in state:
            dfs(p, [p])
    assert not cycles, "\n".join(cycles)


def _closure(start: str) -> dict[str, tuple[str, int] | None]:
    """Every project module that importing ``start`` runs (module-level imports,
    transitively; importing a module runs its parent packages' ``__init__`` too), each
    with the (module, line) that first brought it in (None for ``start``)."""
    seen: dict[str, tuple[str, int] | None] = {start: None}
    todo = [start]
    while todo:
        m = todo.pop(0)  # breadth first: each chain reported is a shortest one
        parts = m.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]
        found = [(p, None) for p in parents] + [(t, line) for t, line, fn in IMPORTS[m] if not fn]
        for target, line in found:
            if target in MODULES and target not in seen:
                seen[target] = (m, line if line is not None else 0)
                todo.append(target)
    return seen


def test_the_trainers_and_the_loop_import_no_sampling_or_evaluation():
    def forbidden(m):
        return _package(m) in NOT_FROM_TRAINING

    bad = []
    for start in TRAINING_ROOTS:
        seen = _closure(start)
        reached = sorted(m for m in seen if forbidden(m))
        # Report where each chain first enters a forbidden package, with the chain to it.
        for m in reached:
            if forbidden(seen[m][0]):
                continue
            chain, here = [], m
            while seen[here] is not None:
                parent, line = seen[here]
                if line:
                    chain.append(f"{_where(parent, line)} imports {here}")
                else:
                    chain.append(f"importing {parent} runs {MODULES[here].relative_to(ROOT)}")
                here = parent
            bad.append(f"{start} reaches {m}:\n  " + "\n  ".join(reversed(chain)))
        if reached:
            bad.append(f"({start} reaches {len(reached)} modules of {NOT_FROM_TRAINING} in all)")
    assert not bad, "\n".join(bad)
