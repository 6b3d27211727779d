"""Rules of the code's shape, checked on the source with ast so they stay true by themselves.

(a) no import cycle among imgcls modules, except inside the model registry (imgcls.models);
    imports inside functions count too, so a cycle cannot hide in one;
(b) no comparison of a strategy with a strategy name outside train/strategies.py;
(c) no run-folder file name as a literal outside train/run_folder.py (RunFolder owns them);
(d) no read of a Dataset's `.images` tensor outside data/: everything gathers through `Dataset.source`,
    so any kind of ImageSource (memory-mapped, streamed) serves the whole package.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from imgcls.train.run_folder import RunFolder

SRC = Path(__file__).resolve().parent.parent / "src"

# Violations that predate the rules and wait for their code to be reshaped; none may be added.
# Empty: every rule holds on the whole package.
KNOWN_VIOLATIONS: dict = {"cycles": set(), "strategy comparisons": Counter()}

# Where a run-folder file name means something else: the dataset's class-name file, and the file
# name of a Hugging Face hub checkpoint.
OTHER_MEANINGS = {("imgcls/data/classes.py", "classes.json"), ("imgcls/data/fashion_mnist.py", "classes.json"),
                  ("imgcls/models/weights.py", "model.safetensors")}
REGISTRY_PACKAGE = "imgcls.models"
STRATEGIES_MODULE = "imgcls/train/strategies.py"
RUN_FOLDER_MODULE = "imgcls/train/run_folder.py"
DATA_PACKAGE = "imgcls/data/"
# What a Dataset is called where it is used; other `.images` (a server request's, the Model API's
# method) belong to other objects.
DATASET_NAMES = {"data", "dataset", "train_data", "test_data", "val_data"}
DATASET_LOADERS = {"load_dataset", "load"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The imgcls modules a source imports anywhere in it, inside functions too."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import mod` imports mod; `from mod import name`, mod
                sub = f"{node.module}.{alias.name}"
                found |= {sub} if sub in modules else {node.module} & modules
    return found


def import_cycle_edges(sources: dict[str, str]) -> set[tuple[str, str]]:
    """Every import edge that lies on a cycle (both ends in one strongly connected component),
    except cycles wholly inside the model registry package."""
    graph = {name: imported_modules(ast.parse(text), set(sources)) - {name} for name, text in sources.items()}
    component = strongly_connected(graph)
    edges = set()
    for a, targets in graph.items():
        for b in targets:
            if component[a] == component[b]:
                members = [m for m, c in component.items() if c == component[a]]
                if not all(m == REGISTRY_PACKAGE or m.startswith(REGISTRY_PACKAGE + ".") for m in members):
                    edges.add((a, b))
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> dict[str, int]:
    """Tarjan's algorithm: node -> component number."""
    index, low, on_stack, stack, component = {}, {}, set(), [], {}

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            number = len(set(component.values()))
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component[member] = number
                if member == node:
                    break

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return component


def _is_strategy(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr == "strategy"
    if isinstance(node, ast.Name):
        return node.id == "strategy"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "strategy"
    return False


def _is_name_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_name_literal(e) for e in node.elts)
    return False


def strategy_comparisons(text: str) -> list[str]:
    """`x.strategy == "finetune"`, `strategy in ("head", "partial")`...: branching on a strategy's name."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_strategy(s) for s in sides) and any(_is_name_literal(s) for s in sides):
                found.append(ast.unparse(node))
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def file_name_literals(text: str, names: set[str]) -> list[str]:
    """String literals that are a run-folder file name, or a path ending in one (docstrings aside)."""
    tree = ast.parse(text)
    skip = _docstrings(tree)
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and any(node.value == n or node.value.endswith("/" + n) for n in names)]


def _is_dataset(node: ast.AST) -> bool:
    """`data`, `prepared.data`, `load_dataset(...)`, `predictor.load(...)`: but not the module imgcls.data."""
    if isinstance(node, ast.Name):
        return node.id in DATASET_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in DATASET_NAMES and ast.unparse(node) != "imgcls.data"
    if isinstance(node, ast.Call):
        func = node.func
        return (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) in DATASET_LOADERS
    return False


def dataset_image_reads(text: str) -> list[str]:
    """Reads of a Dataset's whole-set tensor (`data.images[idx]`, `len(prepared.data.images)`)."""
    return [ast.unparse(node) for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Attribute) and node.attr == "images" and _is_dataset(node.value)]


def sources() -> dict[str, tuple[str, str]]:
    """module name -> (path relative to src/, source text), for every module of the package."""
    return {module_name(p, SRC): (p.relative_to(SRC).as_posix(), p.read_text(encoding="utf-8"))
            for p in sorted((SRC / "imgcls").rglob("*.py"))}


def test_no_new_import_cycle() -> None:
    edges = import_cycle_edges({name: text for name, (_, text) in sources().items()})
    assert edges - KNOWN_VIOLATIONS["cycles"] == set()
    assert KNOWN_VIOLATIONS["cycles"] - edges == set(), "a known cycle is gone: take it off the list"


def test_no_new_strategy_comparison_outside_the_strategies_module() -> None:
    found = Counter((path, expr) for path, text in sources().values() if path != STRATEGIES_MODULE
                    for expr in strategy_comparisons(text))
    assert found - KNOWN_VIOLATIONS["strategy comparisons"] == Counter()
    assert KNOWN_VIOLATIONS["strategy comparisons"] - found == Counter(), "a known one is gone: take it off"


def test_run_folder_file_names_live_only_in_run_folder() -> None:
    names = set(RunFolder.written_files())
    found = {(path, literal) for path, text in sources().values() if path != RUN_FOLDER_MODULE
             for literal in file_name_literals(text, names)}
    assert found - OTHER_MEANINGS == set()


def test_only_the_data_package_reads_a_datasets_images_tensor() -> None:
    found = {(path, expr) for path, text in sources().values() if not path.startswith(DATA_PACKAGE)
             for expr in dataset_image_reads(text)}
    assert found == set()


def test_the_rules_catch_a_new_violation() -> None:
    """Each check on a synthetic source: what a new violation looks like is really found."""
    cycle = {"imgcls.a": "from imgcls import b\n", "imgcls.b": "def f():\n    from imgcls.a import g\n",
             "imgcls.models.x": "import imgcls.models.y\n", "imgcls.models.y": "from imgcls.models import x\n",
             "imgcls.c": "import imgcls.a\n"}
    assert import_cycle_edges(cycle) == {("imgcls.a", "imgcls.b"), ("imgcls.b", "imgcls.a")}
    assert strategy_comparisons("if config.strategy == 'finetune' or cell.strategy in ('head', 'partial'):\n"
                                "    pass\nok = a.strategy == b.strategy\n") == \
        ["config.strategy == 'finetune'", "cell.strategy in ('head', 'partial')"]
    assert file_name_literals('"""Reads run.json."""\npath = out / "run.json"\nx = f"{out}/model.safetensors"\n'
                              'msg = "see run.json for details"\n', {"run.json", "model.safetensors"}) == \
        ["run.json", "/model.safetensors"]
    assert sorted(dataset_image_reads("x = data.images[idx]\nn = len(prepared.data.images)\n"
                               "t = predictor.load(d).images\nu = load_dataset(d).images\n"
                               "ok = [r.images for r in live] + [self.images(x), imgcls.data.images]\n")) == \
        ["data.images", "load_dataset(d).images", "predictor.load(d).images", "prepared.data.images"]
