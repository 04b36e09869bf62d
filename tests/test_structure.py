"""The shape of the code base, checked from the source (ast; nothing is imported).

- The library never imports the pipeline or the launchers: ``data_pipeline`` and
  ``launch`` depend on ``audiodiff_jax``, never the reverse.
- No import cycle between project modules.
- Project modules are imported at module top; an import inside a function is allowed
  only for an optional or heavy dependency, with a comment on the line above (or the
  same line) saying why.
"""

import ast
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
