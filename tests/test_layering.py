"""The import contract of ARCHITECTURE.md §1: ``Model`` is the only door into the model.

Every module of lmscope outside ``lmscope/models/`` is read with ``ast`` (nothing is imported or
run) and checked:

* it reaches ``lmscope.models`` only through its public face (the names ``lmscope.models`` exports);
* it touches no native module tree or adapter: no attribute ``.hf``, ``.adapter``, ``.final_norm``
  or ``.block`` on anything;
* a method family imports no other family, except the shared layer and the declared exceptions;
* the shared layer (results, sites, interventions, errors, paths, plot, data) imports no family
  other than ``data`` and nothing of ``lmscope.models``.

The checker itself is tested on small synthetic sources that break each rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmscope
import lmscope.models

ROOT = Path(lmscope.__file__).parent
FAMILIES = frozenset({"attribution", "localization", "decoding", "sae", "data", "behaviors", "training", "editing",
                      "app"})
# importable by every layer above it; ``data`` is a family too (it obeys the family rules itself)
SHARED = frozenset({"errors", "sites", "interventions", "results", "paths", "plot", "data", "specs", "targets"})
TOP = frozenset({"cli", "app", "__init__", "__main__"})  # user interfaces and the package face: may use every family
# (importing family, imported family) -> why the exception is allowed. None are needed today: decoding
# and sae reach corpora and activation stores through ``data``, which is shared.
EXCEPTIONS: dict[tuple[str, str], str] = {}
FORBIDDEN_ATTRIBUTES = frozenset({"hf", "adapter", "final_norm", "block"})


def _layer(module: str) -> str:
    """The layer of a module: ``lmscope.attribution.gradient`` -> "attribution", ``lmscope`` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).is_dir() or (ROOT / rel).with_suffix(".py").is_file()


def _imports(module: str, tree: ast.AST, is_package: bool = False):
    """(line, imported module, imported name or None) for every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                pkg = pkg if is_package else pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, base, alias.name


def violations(module: str, source: str, models_public: frozenset[str], *, is_package: bool = False,
               exceptions: dict[tuple[str, str], str] = EXCEPTIONS) -> list[str]:
    """Every breach of the contract in ``source``, the text of module ``module`` (outside lmscope.models)."""
    tree = ast.parse(source)
    layer, out = _layer(module), []
    for line, target, name in _imports(module, tree, is_package):
        if not (target == "lmscope" or target.startswith("lmscope.")):
            continue
        if target == "lmscope" and name is not None and _is_module(f"lmscope.{name}"):
            target, name = f"lmscope.{name}", None  # ``from lmscope import plot``
        where = f"{module}:{line}"
        if target.startswith("lmscope.models"):
            if target != "lmscope.models":
                out.append(f"{where} imports {target}: use the public face of lmscope.models")
            elif name is not None and name != "*" and name not in models_public:
                out.append(f"{where} imports {name!r} from lmscope.models, which does not export it")
            continue
        imported = _layer(target) if target != "lmscope" else "__init__"
        if imported == layer or imported == "__init__":
            continue
        if layer in FAMILIES and imported in FAMILIES and imported not in SHARED \
                and (layer, imported) not in exceptions:
            out.append(f"{where} ({layer}) imports the {imported} family; families import only the shared layer "
                       "and lmscope.models (declare an exception with a reason in EXCEPTIONS if it must)")
        elif layer not in FAMILIES and layer not in TOP and imported in FAMILIES and imported not in SHARED:
            out.append(f"{where}: the shared layer ({layer}) imports the {imported} family")
    if layer not in FAMILIES and layer not in TOP:
        for line, target, _ in _imports(module, tree, is_package):
            if target.startswith("lmscope.models"):
                out.append(f"{module}:{line}: the shared layer ({layer}) imports lmscope.models")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            out.append(f"{module}:{node.lineno} touches .{node.attr}: ask Model for a read-out instead")
    return out


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "models":
            continue
        parts = ["lmscope", *rel.with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), path, is_package


PUBLIC = frozenset(lmscope.models.__all__)


def test_the_package_keeps_the_contract():
    found = [v for module, path, pkg in _modules()
             for v in violations(module, path.read_text(), PUBLIC, is_package=pkg)]
    assert not found, "\n".join(found)


def test_every_declared_exception_is_used():
    used = set()
    for module, path, pkg in _modules():
        strict = violations(module, path.read_text(), PUBLIC, is_package=pkg, exceptions={})
        used |= {key for key in EXCEPTIONS if any(f"({key[0]}) imports the {key[1]} family" in v for v in strict)}
    assert used == set(EXCEPTIONS), f"stale exceptions: {set(EXCEPTIONS) - used}"


def test_the_public_face_exports_what_it_names():
    for name in PUBLIC:
        assert hasattr(lmscope.models, name), name


BAD_FAMILY = '''
from lmscope.models.parts import get_module
from lmscope.models import Model, HookSession
from lmscope.localization.dla import dla
from lmscope.localization import patching
from . import probes
from lmscope.data import load_corpus
from lmscope.results import Result

def f(model):
    emb = get_module(model.hf, model.adapter.embedding.tokens)
    return model.final_norm(emb), model.block(0)
'''


def test_checker_catches_each_breach():
    found = violations("lmscope.decoding.bad", BAD_FAMILY, PUBLIC)
    expected = ["bad:2 imports lmscope.models.parts", "bad:3 imports 'HookSession'",
                "bad:4 (decoding) imports the localization family", "bad:5 (decoding) imports the localization",
                "touches .hf", "touches .adapter", "touches .final_norm", "touches .block"]
    for part in expected:
        assert sum(part in v for v in found) == 1, (part, found)
    assert len(found) == len(expected), found  # same-family (probes), data and results are allowed


def test_checker_applies_exceptions_and_guards_the_shared_layer():
    source = "from lmscope.localization.atp import atp\n"
    assert violations("lmscope.sae.evaluation", source, PUBLIC)
    assert not violations("lmscope.sae.evaluation", source, PUBLIC,
                          exceptions={("sae", "localization"): "a reason"})
    assert not violations("lmscope.cli.main", source + "from lmscope.models import Model\n", PUBLIC)
    assert violations("lmscope.cli.main", "from lmscope.models.loading import list_models\n", PUBLIC)
    shared = violations("lmscope.results", source + "from lmscope.models import Model\n", PUBLIC)
    assert len(shared) == 2 and all("shared layer" in v for v in shared)
    assert not violations("lmscope.results", "from lmscope import __version__\nfrom lmscope import plot\n", PUBLIC)
    relative = violations("lmscope.attribution", "from ..decoding import probes\n", PUBLIC, is_package=True)
    assert len(relative) == 1 and "decoding family" in relative[0]


@pytest.mark.parametrize("attr", sorted(FORBIDDEN_ATTRIBUTES))
def test_checker_catches_native_access_anywhere(attr):
    source = f"def f(m):\n    return getattr(m, 'x') or m.{attr}\n"
    for module in ("lmscope.plot", "lmscope.cli.main", "lmscope.sae.training"):
        assert len(violations(module, source, PUBLIC)) == 1
