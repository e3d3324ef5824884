"""The package's layers import one way (DESIGN.md section 3): a module never imports a module of a higher
layer, also not inside a function, and the import graph has no cycles."""

import ast
from pathlib import Path

import spatia_hf

PACKAGE = Path(spatia_hf.__file__).parent
# lowest first; a name is the first folder (or root-level module) under spatia_hf/
LAYERS = (
    ("utils",),
    ("hub",),  # cards, push, mixins: what models' save_pretrained / push_to_hub call (as transformers.utils.hub)
    ("models",),
    ("data",),
    ("pipelines", "training", "inference"),  # inference: embeddings over a dataset, used by evaluation and tl
    ("evaluation",),
    ("tl", "demo", "cli", "commands", "_compat", "__init__"),
)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imported(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its file (ast, functions included)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_pkg else -1]
                base = base[: len(base) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            names = [f"{full}.{a.name}" for a in node.names] + [full]
        for name in names:
            while name and name not in mods and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in mods and name != module and name.startswith("spatia_hf"):
                out.add(name)
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: _imported(m, p, mods) for m, p in mods.items()}
    # a package's __init__ runs before its submodules; importing the root package is the top layer's job
    return {m: {t for t in targets if t not in ("spatia_hf.__init__", "spatia_hf")} for m, targets in graph.items()}


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{m} -> {t}" for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m))
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_is_in_a_layer():
    for module in _modules():
        _layer(module)


def test_the_loopback_hub_is_not_shipped():
    assert not (PACKAGE / "testing").exists()
