"""The import graph of `sae/` has layers: every import (module level or inside a function) points
down or sideways within its package, and no module imports itself back through others. Run it
alone with `python -m pytest tests/unit/test_layering.py`; the layer table below is the map."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sae"
# lowest first; a module may import its own layer's packages only within its own package
LAYERS = [
    {"errors"},
    {"atomic_io", "run_lock", "hardware", "world", "signals"},
    {"tasks", "saes", "tracking"},
    {"host_models", "parallel"},
    {"activations"},
    {"metrics"},
    {"training"},
    {"config"},
    {"jobs", "slurm_preflight"},
    {"launch"},
    {"analysis"},
    {"dashboard"},  # latent dashboards: compose analysis, write static sites
    {"bench"},  # benchmarks and studies: never imported by the trainer (bench.real composes configs with analysis)
    {"__init__"},
]
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """{module: the sae modules it imports anywhere in its body}."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sae":
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sae"}
        graph[module_name(path)] = targets
    return graph


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    assert {top_package(m) for m in imports()} <= set(LAYER_OF), "add new packages to LAYERS"


def test_imports_point_down_the_layers():
    upward = [f"{source} -> {target}" for source, targets in imports().items() for target in targets
              if top_package(source) != top_package(target)
              and LAYER_OF[top_package(target)] >= LAYER_OF[top_package(source)]]
    assert upward == []


def test_no_import_cycles_between_modules():
    graph = imports()
    known = set(graph)

    def resolve(target: str) -> str | None:  # `from sae.x import y` may name a module or a package
        return target if target in known else None

    edges = {m: {t for t in map(resolve, targets) if t and t != m} for m, targets in graph.items()}
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_lines_stay_readable():
    """No line of the package, the scripts or the launcher plugin is wider than 120 characters."""
    root = PACKAGE.parent
    wide = [f"{path.relative_to(root)}:{number}" for folder in ("sae", "scripts", "hydra_plugins")
            for path in sorted((root / folder).rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert wide == []
