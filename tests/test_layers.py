"""The tree shows the data flow and imports only go down.

The packages of `src/unitune`, in the order data moves through them: infrastructure, records,
models, losses, schedules, scorers, the config, evaluation, training, merging, the jobs, studies,
the command line. A module may import only from its own package or from packages below it
(imports for type checking only are exempt), and inside a package the imports between its modules
form no cycle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "unitune"

LAYERS = [
    "core",  # atomic I/O, progress, allocator, secrets, resource usage, signals: imports nothing
    "data",  # records -> validated, tokenized token arrays
    "models",  # source, loading, LoRA, saving, fingerprints, log-probs
    "objectives",  # pure losses + registry
    "schedules",  # which objectives train at each step
    "judges",  # scorers of generated answers (eval.judge is validated by their registry)
    "rewards",  # reward functions, models and judges combined with weights; reward shaping
    "config",  # the run's config, validated by the registries below
    "eval",  # held-out metrics, generation, win rate, retention, chat
    "training",  # batches, references, policy, the loop, state, checkpoints, run directory
    "merging",  # merge methods, PAFT (two training runs + a merge)
    "jobs",  # what `unitune train` runs
    "study",  # sweeps, reports, plots, the demo
    "cli",
    "__main__",  # `python -m unitune`: the command
]
EXEMPT = {"__init__", "api"}  # the package's public API: lazy re-exports of every layer


def unit(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def unitune_imports(path: Path) -> set[str]:
    """Dotted module names (below `unitune.`) that `path` imports, outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = {  # `if TYPE_CHECKING:` blocks
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
        and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }  # fmt: skip
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unitune"):
            mod = node.module.removeprefix("unitune").removeprefix(".")
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                out.add(sub if (SRC / sub.replace(".", "/")).with_suffix(".py").exists() else mod)
        elif isinstance(node, ast.Import):
            out |= {
                a.name.removeprefix("unitune.") for a in node.names if a.name.startswith("unitune.")
            }
    return {m for m in out if m}


def modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        out.append((rel, ".".join(rel.with_suffix("").parts)))
    return out


def test_every_package_has_a_layer():
    for path in SRC.iterdir():
        if path.suffix == ".py" and path.stem not in EXEMPT:
            assert path.stem in LAYERS, f"unitune.{path.stem} is in no layer"
        elif path.is_dir() and (path / "__init__.py").exists():
            assert path.name in LAYERS, f"unitune.{path.name} is in no layer"


def test_imports_only_go_down():
    bad = []
    for rel, _ in modules():
        if rel.parts[0].removesuffix(".py") in EXEMPT:
            continue
        top = unit(rel)
        for dep in unitune_imports(SRC / rel):
            dep_top = dep.split(".")[0]
            if dep_top != top and LAYERS.index(dep_top) > LAYERS.index(top):
                bad.append(f"{rel} imports unitune.{dep}")
    assert not bad, "imports that do not go down:\n" + "\n".join(bad)


def test_no_cycle_inside_a_package():
    graph: dict[str, set[str]] = {}
    for rel, name in modules():
        top = unit(rel)
        deps = {d for d in unitune_imports(SRC / rel) if d.split(".")[0] == top and d != name}
        # a package's __init__ re-exports its modules; importing the package means its __init__
        graph[name] = {d if (SRC / d.replace(".", "/")).with_suffix(".py").exists()
                       else f"{d}.__init__" for d in deps}  # fmt: skip
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
