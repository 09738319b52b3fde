"""The package's shape, read from the source with ast: no import cycle inside oodlab/, methods
free of Ray/Optuna/MLflow, no private name imported across modules, every method registered."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

from oodlab import registry
from oodlab.experiment import ConfigError, Experiment, TrialConfig

PKG = REPO / "oodlab"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in the file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def import_graph() -> dict[str, set[str]]:
    """oodlab module -> the oodlab modules it imports (``from oodlab import data`` counts as oodlab.data,
    ``from oodlab.data import load`` as oodlab.data)."""
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for target, names in _imports(path):
            subs = {f"{target}.{n}" for n in names} & files.keys()
            for t in subs if subs and len(subs) == len(names) else {target, *subs}:
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_oodlab():
    graph = import_graph()
    assert graph["oodlab.registry"] >= {"oodlab.methods.negprior", "oodlab.experiment"}  # the graph sees imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_experiment_and_methods_do_not_import_the_registry_or_services():
    graph = import_graph()
    assert "oodlab.registry" not in graph["oodlab.experiment"]
    services = ("ray", "optuna", "mlflow")
    for path in (PKG / "methods").glob("*.py"):
        mods = [m for m, _ in _imports(path)]
        assert not [m for m in mods if m.split(".")[0] in services], f"{path.name} imports a service"
        assert "oodlab.registry" not in mods and "oodlab.trainable" not in mods, path.name


def test_no_private_name_imported_across_modules():
    offenders = [f"{p.relative_to(PKG.parent)}: from {m} import {n}"
                 for p in [*PKG.rglob("*.py"), *PKG.parent.glob("studies/*.py"), *PKG.parent.glob("benchmarks/*.py")]
                 for m, names in _imports(p) if m.startswith("oodlab")
                 for n in names if n.startswith("_")]
    assert not offenders, offenders


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_registry_holds_config_and_experiment_classes(name):
    method = registry.get(name)
    assert issubclass(method.config, TrialConfig) and issubclass(method.experiment, Experiment)
    assert method.config().method == name  # a config built with defaults runs this method
    assert not getattr(method.experiment, "__abstractmethods__", None), "an abstract method is not implemented"


def test_adding_a_method_doc_example(monkeypatch, tmp_path):
    """docs/adding-a-method.md's example, registered with its one line, runs a real trial."""
    doc = (PKG.parent / "docs" / "adding-a-method.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {"__name__": "mean_distance"}
    exec(compile(code, "adding-a-method.md", "exec"), ns)
    monkeypatch.setitem(registry.METHODS, "mean_distance", registry.Method(ns["Config"], ns["MeanDistance"]))
    config = {"method": "mean_distance", "id": "fashion_mnist", "ood": "mnist", "train_n": 200, "test_n": 200,
              "device": "cpu"}
    res = registry.run_trial(config)
    assert res.epoch == 1 and 0.0 <= res.metrics["auroc_mnist_distance"] <= 1.0
    with pytest.raises(ConfigError, match="power"):
        registry.build_config({**config, "power": 0})
