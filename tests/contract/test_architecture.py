"""The layering the architecture (docs/architecture.md) promises, read from the source with ast:
no import circle among the project's modules, the guest driver depends on the card's programming
interface (device/contract) only, and that interface is standard library only."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("device", "firmware_model", "guest_tools", "ipsec_nic", "qemu")
CARD_SIDE = ("device", "firmware_model", "ipsec_nic", "qemu")
# guest_tools/linux/ (the kernel driver's tooling) runs on the host and is not the guest's python3 driver.
GUEST_EXEMPT = ("guest_tools.linux",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_sources() -> dict[str, str]:
    sources = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            sources[module_name(path)] = path.read_text(encoding="utf-8")
    return sources


def imports_of(module: str, source: str, known: Iterable[str]) -> list[tuple[str, int, str]]:
    """(imported project-or-external module, line, enclosing function or "") for every import statement,
    at any depth (a late import inside a function still ties the modules together)."""
    known = set(known)
    is_package = any(k.startswith(module + ".") for k in known)
    out: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, func) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    candidate = f"{base}.{alias.name}" if base else alias.name
                    out.append((candidate if candidate in known else base, child.lineno, func))
            visit(child, inner)

    visit(ast.parse(source), "")
    return out


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """module -> project modules it imports (an import of a.b.c also runs a and a.b, but those are
    package __init__ files, which this project keeps free of imports)."""
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        edges = set()
        for target, _line, _func in imports_of(module, source, sources):
            while target and target not in sources:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(limit)  # other tests rely on the default limit
    return found


def guest_violations(sources: Mapping[str, str]) -> list[str]:
    """Imports of the card's side (anything but device.contract) by the guest tools."""
    bad = []
    for module, source in sources.items():
        if not module.startswith("guest_tools") or module.startswith(GUEST_EXEMPT):
            continue
        for target, line, _func in imports_of(module, source, sources):
            if target.split(".")[0] in CARD_SIDE and not target.startswith("device.contract"):
                bad.append(f"{module}:{line} imports {target}")
    return bad


def contract_violations(sources: Mapping[str, str]) -> list[str]:
    """Imports by device/contract of anything but the standard library and device.contract itself.
    The one exception is PyYAML inside yaml_file.read_yaml (only when a file is read)."""
    bad = []
    for module, source in sources.items():
        if not module.startswith("device.contract"):
            continue
        for target, line, func in imports_of(module, source, sources):
            top = target.split(".")[0]
            if target.startswith("device.contract") or top in sys.stdlib_module_names:
                continue
            if (module, top, func) == ("device.contract.yaml_file", "yaml", "read_yaml"):
                continue
            bad.append(f"{module}:{line} imports {target}")
    return bad


def test_guest_tools_import_only_the_contract_of_the_card():
    assert guest_violations(project_sources()) == []


def test_guest_check_can_fail():
    fake = {"guest_tools.x": "from device.nic import card\nfrom device.contract import regs\n",
            "guest_tools.y": "def f():\n    import firmware_model.esp\n",
            "device.contract.regs": "", "device.nic.card": "", "firmware_model.esp": ""}
    assert guest_violations(fake) == ["guest_tools.x:1 imports device.nic.card",
                                      "guest_tools.y:2 imports firmware_model.esp"]


def test_contract_is_standard_library_only():
    assert contract_violations(project_sources()) == []


def test_contract_check_can_fail():
    fake = {"device.contract.a": "import yaml\nfrom device.nic import card\nimport struct\n", "device.nic.card": ""}
    assert contract_violations(fake) == ["device.contract.a:1 imports yaml", "device.contract.a:2 imports device.nic.card"]


def test_no_import_circle_among_the_project_modules():
    assert cycles(import_graph(project_sources())) == []


def test_circle_check_can_fail():
    fake = {"a.x": "from a import y\n", "a.y": "def late():\n    import a.z\n", "a.z": "from a.x import thing\n",
            "a.w": "import a.x\n"}
    assert cycles(import_graph(fake)) == [["a.x", "a.y", "a.z"]]
