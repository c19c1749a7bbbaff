"""The package's layout (issue 10): one-way imports, modules of readable size, one module
that picks the back end. These fail on a reintroduced import circle (routing -> native ->
topology -> routing was one), on a module that grows past what one reader holds, and on a
second place that branches on the device."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "blocksparse_moe"
# Files allowed past 400 lines: one kernel family each, which the file header explains.
LONG_KERNEL_FAMILIES = {"kernels/experts.py": 700, "kernels/experts_fp8.py": 450, "cpu/products.py": 600}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """Package modules ``path`` imports at module level (function-local imports are lazy)."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("blocksparse_moe"):
                out.add(mod)
                for alias in node.names:  # `from . import backend` imports a module
                    out.add(f"{mod}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("blocksparse_moe"))
    return out


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    assert "blocksparse_moe.routing" in graph and "blocksparse_moe.native" in graph  # the walk sees the package
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(dep) == "open" and not node.startswith(dep + "."):
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("path", sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")))
def test_module_size(path):
    lines = len((PACKAGE / path).read_text().splitlines())
    limit = LONG_KERNEL_FAMILIES.get(path, 400)
    assert lines <= limit, f"{path} has {lines} lines (limit {limit}): split it by concern"


def test_device_decided_in_one_module():
    """Only backend.py (and the native loader's own CPU/CUDA build choice, which asks
    backend.native_device) may branch on ``device.type``/``TRITON_INTERPRET`` to pick how
    to compute; the measuring modules (costs, timing, the main job) branch only on how to
    measure (synchronize, do_bench, peak memory)."""
    allowed = {"backend.py", "interpreter.py", "costs.py", "timing.py", "__main__.py", "kernels/_common.py"}
    offenders = []
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE).as_posix()
        if rel in allowed:
            continue
        text = p.read_text()
        for needle in ('.type == "cuda"', ".type == 'cuda'", '.type != "cuda"', '.type == "cpu"', "TRITON_INTERPRET\")",
                       "is_cuda"):
            if needle in text:
                offenders.append(f"{rel}: {needle}")
    assert not offenders, offenders


def test_kernels_do_not_import_backend():
    """The Triton back end (kernels/) never imports the module that picks it (backend.py),
    not even inside a function: kernels -> backend -> kernels was a cycle (issue 18). What
    kernels need of the environment comes from the leaf module interpreter.py."""
    offenders = []
    for p in (PACKAGE / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {a.name for a in node.names}
                if (node.module or "").endswith("backend") or (node.level and not node.module and "backend" in names):
                    offenders.append(p.relative_to(PACKAGE).as_posix())
            elif isinstance(node, ast.Import) and any(a.name.endswith(".backend") for a in node.names):
                offenders.append(p.relative_to(PACKAGE).as_posix())
    assert not offenders, offenders
