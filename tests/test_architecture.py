"""Imports run one way, down the floors (ARCHITECTURE.md#floors): no circle between modules, and no
module imports a floor above its own. Every import counts, inside functions too; only imports
under `if TYPE_CHECKING:` (type hints, never run) are left out of the circle check."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qoq"

# Bottom to top. A module may import its own floor and the floors below it.
FLOORS = ("config", "distributed", "kernels", "layers", "model")
# Above the model: which top-level parts must not import which.
FORBIDDEN_ABOVE = {
    "quant": {"engine", "server", "cli"},  # the offline quantizer sits beside the engine
    "engine": {"quant", "server", "cli", "generate"},  # generate drives the engine (LLM), not the reverse
    "server": {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports_of(name: str) -> list[tuple[str, int, bool]]:
    """(imported qoq module, line, type-checking only) for every import in module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    typing_only = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.split(".")[0] == "qoq" and target != "qoq":
                found.append((target, node.lineno, node.lineno in typing_only))
    return found


def part(name: str) -> str:
    """The top-level part of the package a module belongs to: "model" for qoq.model.loader."""
    pieces = name.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def test_module_names_resolve():
    unknown = [f"{name}:{line} imports {target}" for name in MODULES for target, line, _ in imports_of(name)
               if target not in MODULES]
    assert not unknown, unknown


def test_no_import_circle():
    graph = {name: {t for t, _, typing_only in imports_of(name) if not typing_only and t != name} for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_run_down_the_floors():
    wrong = []
    for name in MODULES:
        here = part(name)
        for target, line, _ in imports_of(name):
            there = part(target)
            if here in FLOORS and (there not in FLOORS or FLOORS.index(there) > FLOORS.index(here)):
                wrong.append(f"{name}:{line} imports {target} (a floor above {here})")
            if there in FORBIDDEN_ABOVE.get(here, ()):
                wrong.append(f"{name}:{line} imports {target} ({here} never imports {there})")
    assert not wrong, "\n".join(wrong)


def test_lower_floors_import_at_module_level():
    """Imports inside functions hide an order the floors should make plain; below the engine,
    qoq modules import each other only at the top (third-party optional dependencies aside)."""
    late = []
    for name, path in MODULES.items():
        if part(name) not in FLOORS + ("quant",):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("qoq"):
                        late.append(f"{name}:{inner.lineno} imports {inner.module} inside {node.name}")
    assert not late, late
