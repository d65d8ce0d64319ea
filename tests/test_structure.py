"""The package's structure: which modules import which (read from the source, lazy imports included)."""

import ast
import sys
from pathlib import Path

from memorizing_transformers import MemorizingConfig
from memorizing_transformers.config import _CHOICES
from memorizing_transformers.memory.backend import BACKENDS
from memorizing_transformers.memory.knn_memory import make_backend

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "memorizing_transformers"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """For every module of the package, the modules of the package it imports anywhere in its source."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, `level - 1` packages up
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t.startswith("memorizing_transformers")}
        graph[name] = found
    modules = set(graph)
    return {name: {t for t in targets if t in modules and t != name} for name, targets in graph.items()}


def cycles_among(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Import cycles among the modules named with `prefix` (a depth-first search)."""
    nodes = {n for n in graph if n.startswith(prefix)}
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node] & nodes):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_of_the_package_imports_itself_through_others():
    assert cycles_among(imports(), "memorizing_transformers") == []


def test_no_subpackage_imports_itself_through_others():
    top = lambda module: ".".join(module.split(".")[:2])  # noqa: E731  the subpackage (or top-level module)
    packages: dict[str, set[str]] = {}
    for name, targets in imports().items():
        packages.setdefault(top(name), set()).update(top(t) for t in targets if top(t) != top(name))
    assert cycles_among(packages, "memorizing_transformers") == []


def test_the_memory_package_needs_nothing_above_it():
    graph = imports()
    outside = {
        t
        for n, ts in graph.items()
        if n.startswith("memorizing_transformers.memory")
        for t in ts
        if not t.startswith("memorizing_transformers.memory")
    }
    assert outside <= {"memorizing_transformers.atomic"}
    # Each backend knows only the interface module, and the exact and IVF searches their CPU kernel, which knows
    # nothing.
    kernel = "memorizing_transformers.memory.cpu_kernel"
    for backend, own in (("exact", {kernel}), ("ivf", {kernel}), ("faiss_search", set())):
        assert graph[f"memorizing_transformers.memory.{backend}"] == {"memorizing_transformers.memory.backend"} | own
    assert not graph[kernel]


def test_the_model_imports_only_torch_einops_and_the_core():
    # The network reads in one sitting: no tokenizer, no files, no Hugging Face.
    core = ("memorizing_transformers.config", "memorizing_transformers.memory", "memorizing_transformers.model")
    for path in (PACKAGE / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                name = module_name(path).rsplit(".", 1)[0].rsplit(".", node.level - 1)[0] + "." + (node.module or "")
            elif isinstance(node, (ast.ImportFrom, ast.Import)):
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            else:
                continue
            top = name.split(".")[0]
            allowed = name.startswith(core) or top in {"torch", "einops"} or top in sys.stdlib_module_names
            assert allowed, f"{path.name} imports {name}"


def test_the_configuration_imports_nothing_of_the_memory():
    assert not {t for t in imports()["memorizing_transformers.config"] if ".memory" in t}


def test_the_cycle_check_finds_a_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": set()}
    assert cycles_among(graph, "p") == [["p.a", "p.b", "p.c", "p.a"]]


def test_the_configuration_offers_the_backends_the_factory_builds():
    assert _CHOICES["memory_backend"] == BACKENDS
    for name in BACKENDS:
        make_backend(name)
        MemorizingConfig(memory_backend=name)
