"""The layers of docs/ARCHITECTURE.md, checked on every import in the tree (AST, no import runs).

contracts -> algorithm -> methods -> (tracking, stagekit, retrieval) -> components -> pipeline.py -> dcml_app -> bench:
a module imports only from its own layer and the layers before it; components
never import each other; bench touches no private name of the project.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("dcml", "components", "pipeline", "dcml_app", "bench", "data_prep")

# Layer of a module path (dotted) -> the project packages it may import.
LIBRARY = {
    "dcml.contracts": ("dcml.contracts",),
    "dcml.algorithm": ("dcml.contracts", "dcml.algorithm"),
    "dcml.methods": ("dcml.contracts", "dcml.algorithm", "dcml.methods"),
    "dcml.model_files": ("dcml.contracts", "dcml.algorithm", "dcml.methods", "dcml.model_files"),
    "dcml.tracking": ("dcml.contracts", "dcml.algorithm", "dcml.methods", "dcml.model_files", "dcml.tracking"),
    "dcml.stagekit": ("dcml.contracts", "dcml.algorithm", "dcml.methods", "dcml.model_files", "dcml.stagekit"),
    "dcml.retrieval": ("dcml.contracts", "dcml.algorithm", "dcml.methods", "dcml.model_files", "dcml.retrieval"),
    "dcml.launch": ("dcml.contracts", "dcml.algorithm", "dcml.launch"),
    "dcml.trainjob": ("dcml.contracts", "dcml.algorithm", "dcml.launch", "dcml.trainjob"),
    "dcml": (),  # dcml/__init__.py: imports nothing of the project (its API names load lazily, by module name)
}
BELOW_COMPONENTS = ("dcml", "data_prep")


def modules():
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "build", "runs") or rel.parts[0].startswith("."):
            continue
        yield rel, ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path):
    """(imported module, names) for every import, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            yield module, [a.name for a in node.names]


def project(module: str) -> bool:
    return module.split(".")[0] in PROJECT


def inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def allowed(importer: str, rel: Path, imported: str) -> bool:
    top = rel.parts[0]
    if top == "dcml":
        layer = next(layer for layer in LIBRARY if inside(importer, layer))
        # `dcml` itself (its __version__) is every layer's.
        return imported == "dcml" or any(inside(imported, ok) for ok in LIBRARY[layer])
    if top == "data_prep":  # the readers sit beside the components, on the library
        return inside(imported, "data_prep") or (inside(imported, "dcml") and not inside(imported, "dcml_app"))
    if top == "components":
        if "tests" in rel.parts:  # tests sit above everything: they may drive the CLI and other stages
            return True
        own = ".".join(rel.parts[:2])
        return inside(imported, own) or any(inside(imported, p) for p in BELOW_COMPONENTS)
    if top == "pipeline.py":
        return any(inside(imported, p) for p in BELOW_COMPONENTS + ("components",))
    if top == "dcml_app":
        return not inside(imported, "bench")
    return True  # bench, tests, conftest: checked separately


def test_every_import_points_down():
    wrong = []
    for rel, name in modules():
        for imported, _ in imports(ROOT / rel):
            if project(imported) and not allowed(name, rel, imported):
                wrong.append(f"{rel} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_bench_uses_public_names_only():
    private = []
    for rel, _ in modules():
        if rel.parts[0] != "bench":
            continue
        for imported, names in imports(ROOT / rel):
            if project(imported) and not inside(imported, "bench"):
                private += [f"{rel}: {imported}.{n}" for n in names if n.startswith("_")]
                private += [f"{rel}: {imported}" for part in imported.split(".") if part.startswith("_")]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("bad,where", [("from components.train.stage import run", "components/finetune/stage.py"),
                                       ("import pipeline", "dcml/algorithm/training.py"),
                                       ("from dcml_app import presets", "dcml/tracking/__init__.py"),
                                       ("from dcml.algorithm import models", "dcml/contracts/io.py")])
def test_the_check_catches_a_wrong_import(bad, where):
    rel = Path(where)
    name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
    imported = ast.parse(bad).body[0]
    module = imported.module if isinstance(imported, ast.ImportFrom) else imported.names[0].name
    assert not allowed(name, rel, module)
