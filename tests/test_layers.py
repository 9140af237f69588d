"""The layout shows the data flow and imports only go down: data → models → logprobs →
objectives → schedules → config → batches/metrics → session → trainer → ... → cli. A module may
import only from layers below its own (imports for type checking only are exempt); a strict
order also rules out any cycle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "unitune"

LAYERS = [
    {
        "data",
        "model_source",
        "checkpoint",
        "interrupts",
        "plots",
        "allocator",
        "usage",
        "redact",
    },  # no imports
    {"models"},
    {"logprobs"},
    {"objectives"},
    {"schedules"},
    {"judges"},  # below config: eval.judge is validated by the judge registry
    {"config"},  # validates objectives' and schedules' options by their registries
    {"trackers"},  # train.report_to (Accelerate's trackers), for engines
    {"batches", "metrics", "delta_l1", "refcache", "merge", "engines"},
    {"rundir"},
    {"generate", "retention"},  # generation-based evaluation: generation, lm-eval retention
    {"chat", "evaluation"},  # `unitune chat`; win rate + retention of a model (`unitune eval`)
    {"modelcard"},  # the saved model's README.md
    {"hub"},  # push_to_hub, unitune push
    {"report"},  # unitune report: reads run directories (plots), no training
    {"session"},
    {"trainer"},
    {"calibration"},
    {"parallel"},
    {"jobs"},
    {"sweep"},
    {"demo"},
    {"cli"},
]


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"unitune.{name} is in no layer: add it to tests/test_layers.py")


def unitune_imports(path: Path) -> set[str]:
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
            parts = node.module.split(".")
            out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("unitune.")}
    return out


def test_imports_only_go_down():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel == Path("__init__.py"):
            continue
        top = rel.parts[0].removesuffix(".py")
        for dep in unitune_imports(path) - {top}:
            if layer_of(dep) >= layer_of(top):
                bad.append(f"{rel} imports unitune.{dep}")
    assert not bad, "imports that do not go down:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for path in SRC.glob("*.py"):
        if path.name != "__init__.py":
            layer_of(path.stem)
    for path in SRC.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            layer_of(path.name)
