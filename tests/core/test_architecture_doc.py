"""docs/architecture.md stays true: every file, module, class, function and table it names exists."""

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("kiln", "train", "export", "serve", "calib", "studio", "docker", "tools")
STAGES = ("train", "export", "serve", "calib", "studio")
# Names the document uses from the libraries kiln builds on, and where they are defined.
THIRD_PARTY = {"APIRouter": "fastapi", "tmp_path": "_pytest.tmpdir"}


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _expand(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py``."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [x for part in m.group(1).split(",") for x in _expand(path[: m.start()] + part + path[m.end():])]


def paths_named(text: str) -> list[str]:
    """Backticked repository paths (``kiln/bundle.py``, ``tests/core/test_layers.py``), braces expanded;
    placeholders such as ``kiln/runtime/<name>.py`` are templates, not files."""
    found = []
    for token in backticked(text):
        if " " in token or "<" in token or "=" in token or "/" not in token:
            continue
        if token.split("/")[0] in (*PACKAGES, "tests", "docs", "docker") or token.endswith(
            (".py", ".md", ".toml")
        ):
            found.extend(_expand(token))
    return found


def modules_named(text: str) -> list[str]:
    """Backticked ``kiln.a.b`` modules, or ``kiln.a.b.name`` for a name in one (``kiln.json`` is a file)."""
    return [t for t in backticked(text) if re.fullmatch(r"kiln(\.\w+)+", t) and t != "kiln.json"]


CODE_NAMES = (
    r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*(\.\w+)?",  # a class, or Class.member
    r"_?[A-Z][A-Z0-9_]+",  # a table or constant
    r"_?[a-z][a-z0-9]*(_[a-z0-9]+)+|_[a-z][a-z0-9]*",  # a function with an underscore, or a private one
)


def names_named(text: str) -> list[str]:
    """Backticked code names: ``CamelCase`` classes, ``UPPER_CASE`` tables and constants, ``snake_case``
    functions with an underscore, and ``Class.member``. Plain lowercase words (task names, formats,
    ``load``) are left to the reader: they are prose as often as code."""
    out = []
    for token in backticked(text):
        token = token.removesuffix("()")
        if any(re.fullmatch(p, token) for p in CODE_NAMES):
            out.append(token)
    return out


@cache
def _definitions() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """Every name defined in the packages (classes, functions, assignments) and each class's members."""
    names: set[str] = set()
    members: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    own = members.setdefault(node.name, set())
                    for item in ast.walk(node):
                        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                            own.add(item.name)
                        elif isinstance(item, ast.Name | ast.Attribute) and isinstance(item.ctx, ast.Store):
                            own.add(item.id if isinstance(item, ast.Name) else item.attr)
                elif isinstance(node, ast.Assign | ast.AnnAssign):
                    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        if isinstance(target, ast.Name):
                            names.add(target.id)
    return frozenset(names), {k: frozenset(v) for k, v in members.items()}


def module_file(module: str) -> Path | None:
    """The source of ``kiln.a.b`` (a stage ``kiln.<stage>`` lives in the top-level folder ``<stage>/``)."""
    parts = module.split(".")[1:]
    base = ROOT.joinpath(*parts) if parts and parts[0] in STAGES else ROOT.joinpath("kiln", *parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


DOC_TEXT = DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", sorted(set(paths_named(DOC_TEXT))))
def test_every_file_the_document_names_exists(path: str) -> None:
    assert (ROOT / path).exists(), f"docs/architecture.md names {path}, which does not exist"


@pytest.mark.parametrize("module", sorted(set(modules_named(DOC_TEXT))))
def test_every_module_the_document_names_exists(module: str) -> None:
    if module_file(module) is None:  # kiln.processing.load_image: a name in a module
        parent, name = module.rsplit(".", 1)
        source = module_file(parent)
        assert source is not None, f"docs/architecture.md names the module {module}, which does not exist"
        assert re.search(rf"^(def|class) {name}\b|^{name}\b.*=", source.read_text(encoding="utf-8"), re.M), \
            f"docs/architecture.md names {module}: {parent} defines no {name}"


@pytest.mark.parametrize("name", sorted(set(names_named(DOC_TEXT))))
def test_every_class_function_and_table_the_document_names_is_defined(name: str) -> None:
    names, members = _definitions()
    if name in THIRD_PARTY:
        assert hasattr(importlib.import_module(THIRD_PARTY[name]), name)
    elif "." in name:
        cls, member = name.split(".", 1)
        assert member in members.get(cls, frozenset()), f"docs/architecture.md names {name}: no such member"
    else:
        assert name in names, f"docs/architecture.md names {name}, which nothing in kiln defines"


def test_the_backend_recipe_names_every_backend_table() -> None:
    """A module-level table of kiln/runtime/__init__.py keyed by backend names is one a new backend must
    be added to: the recipe has to say so."""
    tree = ast.parse((ROOT / "kiln" / "runtime" / "__init__.py").read_text(encoding="utf-8"))
    tables = []
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict):
            keys = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if {"onnxrt", "torch"} <= keys or {"onnx", "torch"} <= keys:
                assert isinstance(target, ast.Name)
                tables.append(target.id)
    recipe = DOC_TEXT[DOC_TEXT.index("**A backend.**"):DOC_TEXT.index("**A model family.**")]
    assert len(tables) >= 5 and all(f"`{t}`" in recipe for t in tables), (tables, "missing from the backend "
                                                                                  "recipe")
    assert "`_cannot_open`" in recipe and "`KilnBackend`" in recipe


def test_the_checks_see_what_they_check() -> None:
    text = "`kiln/bundle.py` `kiln/runtime/{torch,onnxrt}.py` `kiln/runtime/<name>.py` `kiln.train.loop` " \
           "`EngineProvenance` `Trainer.fit` `_OPENERS` `check_provenance` `classify` `kiln train`"
    assert paths_named(text) == ["kiln/bundle.py", "kiln/runtime/torch.py", "kiln/runtime/onnxrt.py"]
    assert modules_named(text) == ["kiln.train.loop"]
    assert names_named(text) == ["EngineProvenance", "Trainer.fit", "_OPENERS", "check_provenance"]
    assert module_file("kiln.train.loop") == ROOT / "train" / "loop.py"
    assert module_file("kiln.bundle") == ROOT / "kiln" / "bundle.py" and module_file("kiln.nothing") is None
    names, members = _definitions()
    assert "Trainer" in names and "fit" in members["Trainer"] and "NoSuchThing" not in names
