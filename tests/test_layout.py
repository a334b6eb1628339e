"""The package's import rules, read from its own code (README, "The package").

- ``method/`` imports nothing of the package but ``errors``, and never ``open_clip_train``;
- ``eval/`` never imports ``host/`` (nor the tools, benchmarks or demo built on it); ``data/``
  imports neither ``host/`` nor ``eval/``;
- only ``host/`` imports ``open_clip_train``'s private (``_underscore``) names, and no subpackage
  imports another's private names;
- tar shards are written by one module; λ is picked per step in one module;
- ``host/`` has no module-level ``NAME = None`` slot carrying a run's state;
- layers, for every subpackage: a module imports only its own subpackage or a lower layer (errors < method
  < data < eval, host < tools < bench, demo < main, cli); eval and host never import each other;
  the top-layer subpackages never import each other in a circle, and no file reaches itself through imports;
- one atomic writer (``os.replace`` only in ``data.files``), one zero-shot head builder
  (``build_zero_shot_classifier`` called only in ``eval.metrics``).
"""
import ast
import os
import re

import pytest

import open_clip_starft

PKG_DIR = os.path.dirname(open_clip_starft.__file__)


def modules():
    """(dotted name, path, source) of every module of the package."""
    for root, _, files in os.walk(PKG_DIR):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG_DIR))[:-3].replace(os.sep, ".")
                with open(path, encoding="utf-8") as fh:
                    yield rel.removesuffix(".__init__"), path, fh.read()


def imports(name, path, source):
    """(imported module, imported name or None) for every import statement of a module."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield module, alias.name


def subpackage(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "open_clip_starft" else None


ALL = list(modules())


SUBPACKAGES = ("method", "data", "host", "eval", "tools", "bench", "demo")


def declared_imports(doc):
    """(allowed, forbidden): the subpackages a subpackage's docstring says it may import ("May import
    ``a``, ``b`` ...", "Imports ... ``a``"; "every lower layer" by ``LAYER``) and those it says it never
    imports ("never ``c``"), from the sentence that states the rule."""
    match = re.search(r"(May import|Imports)\b(.*?)(?:\.\s|\.$)", doc, re.S)
    assert match, "no 'May import ...' / 'Imports ...' sentence"
    sentence = match.group(2).split("imported by")[0]
    allowed_part, _, never_part = sentence.partition("never")
    names = lambda text: {n.split(".")[0] for n in re.findall(r"``([\w.]+)``", text)}  # noqa: E731
    allowed = names(allowed_part)
    if "every lower layer" in allowed_part:
        allowed |= {"errors", *SUBPACKAGES}  # narrowed to the lower layers by the caller
    return allowed, names(never_part)


def imported_by(sub):
    """(the other subpackages and ``errors``, the outside packages) that the modules of subpackage ``sub`` import."""
    ours, outside = set(), set()
    for name, path, source in ALL:
        if subpackage(name) == sub:
            for module, imported in imports(name, path, source):
                there = subpackage(f"{module}.{imported}" if module == "open_clip_starft" and imported else module)
                if there is None and module.split(".")[0] != "open_clip_starft":
                    outside.add(module.split(".")[0])
                elif there not in (None, sub):
                    ours.add(there)
    return ours, outside


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_each_subpackage_says_what_it_may_import_and_its_code_keeps_to_it(sub):
    """Each subpackage's ``__init__`` docstring states its import rule; the rule is read from the sentence
    and checked against the subpackage's code: nothing imported that it does not name, nothing it says it
    never imports."""
    init = os.path.join(PKG_DIR, sub, "__init__.py")
    assert os.path.exists(init), sub
    with open(init, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    allowed, forbidden = declared_imports(doc)
    if "every lower layer" in doc:
        allowed = {s for s in allowed if LAYER.get(s, TOP) < LAYER.get(sub, TOP)}
    assert allowed, f"{sub}/__init__.py names no subpackage it may import"
    used, outside = imported_by(sub)
    assert used <= allowed, f"{sub} imports {sorted(used - allowed)}, which its docstring does not allow ({sorted(allowed)})"
    never = (used | outside) & forbidden
    assert not never, f"{sub} imports {sorted(never)}, which its docstring says it never imports"


def test_the_import_rule_reader_reads_both_kinds_of_sentence():
    assert declared_imports("Imports torch and open_clip only (of this package: ``errors``); never "
                            "``open_clip_train``, so ...") == ({"errors"}, {"open_clip_train"})
    assert declared_imports("May import ``method`` (captions) and ``errors``; never ``host``, ``eval`` or the "
                            "tools.") == ({"method", "errors"}, {"host", "eval"})
    assert declared_imports("May import ``data`` and ``errors``; imported by ``main``.") == ({"data", "errors"}, set())


@pytest.mark.parametrize("name,path,source", ALL, ids=[m[0] for m in ALL])
def test_import_rules(name, path, source):
    here = subpackage(name)
    for module, imported in imports(name, path, source):
        full = f"{module}.{imported}" if module == "open_clip_starft" and imported else module
        there = subpackage(full)
        if here == "method":
            assert not module.startswith("open_clip_train"), f"{name} imports {module}"
            assert there in (None, "method", "errors"), f"{name} imports {full}"
        if here == "eval":
            assert there not in ("host", "tools", "bench", "demo"), f"{name} imports {full}"
        if here == "data":
            assert there not in ("host", "eval", "tools", "bench", "demo"), f"{name} imports {full}"
        if imported and imported.startswith("_") and not imported.startswith("__"):
            if module.startswith("open_clip_train"):
                assert here == "host", f"{name} imports open_clip_train's private {module}.{imported}"
            if there is not None:
                assert there == here, f"{name} imports {there}'s private {module}.{imported}"


def test_one_shard_writer_and_one_lambda_call_site():
    writers = [n for n, _, s in ALL if re.search(r"TarWriter|ShardWriter|tarfile\.open\([^)]*['\"]w", s)]
    assert writers == ["open_clip_starft.data.samples"]
    lam = [n for n, _, s in ALL if re.search(r"\bstar_lambda\(", s) and "def star_lambda(" not in s]
    assert lam == ["open_clip_starft.host.step"]


def test_the_package_never_imports_the_studies():
    """``studies/`` (a checkout's accuracy studies) uses the package; the package never imports it."""
    for name, path, source in ALL:
        for module, _ in imports(name, path, source):
            assert module != "studies" and not module.startswith("studies."), f"{name} imports {module}"


def test_the_wheel_holds_the_plugin_and_no_study(wheel_files):
    """``pip install .`` installs no study code: the wheel built from this checkout, its files listed."""
    names = wheel_files
    assert "open_clip_starft/method/loss.py" in names and "open_clip_starft/demo/run.py" in names
    assert "open_clip_starft/_descriptors/background.txt" in names
    assert not [n for n in names if "studies" in n or "waterbirds_lite" in n], names


def test_no_module_level_run_slot_in_host():
    for name, _, source in ALL:
        if subpackage(name) == "host":
            assert not re.search(r"^[A-Z_]+\s*=\s*None\b", source, re.M), name


def test_every_subpackage_is_installed():
    """pyproject's explicit package list names every package folder (an editable install finds a
    missing one anyway; a wheel would not ship it)."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(os.path.dirname(PKG_DIR), "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {name for name, path, _ in ALL if path.endswith("__init__.py")}
    assert found - listed == set()


LAYER = {"errors": 0, "method": 1, "data": 2, "eval": 3, "host": 3, "tools": 4, "main": 6, "cli": 7}
TOP = 5  # bench, demo


def package_edges():
    """``{module: set of package modules it imports}`` (imports of a package name resolved to the module)."""
    names = {n for n, _, _ in ALL}
    edges = {}
    for name, path, source in ALL:
        targets = set()
        for module, imported in imports(name, path, source):
            for candidate in (f"{module}.{imported}" if imported else None, module):
                if candidate in names:
                    targets.add(candidate)
                    break
        edges[name] = targets - {name}
    return edges


@pytest.mark.parametrize("name,path,source", ALL, ids=[m[0] for m in ALL])
def test_every_subpackage_imports_only_its_own_or_lower_layers(name, path, source):
    here = subpackage(name)
    for module, imported in imports(name, path, source):
        there = subpackage(f"{module}.{imported}" if module == "open_clip_starft" and imported else module)
        if here is None or there is None or there == here:
            continue
        low, high = LAYER.get(there, TOP), LAYER.get(here, TOP)
        assert low < high or (low == high == TOP), f"{name} (layer {high}) imports {module} (layer {low})"
        assert {here, there} != {"eval", "host"}, f"{name} imports {module}: eval and host never import each other"


def test_no_import_circles_between_files_or_top_layer_subpackages():
    edges = package_edges()
    for start in edges:  # a file reaching itself through other files' imports
        seen, todo = set(), list(edges[start])
        while todo:
            node = todo.pop()
            assert node != start, f"{start} imports itself through other modules"
            if node not in seen:
                seen.add(node)
                todo += edges.get(node, ())
    subs = {(subpackage(a), subpackage(b)) for a, bs in edges.items() for b in bs
            if subpackage(a) != subpackage(b) and LAYER.get(subpackage(a), TOP) == LAYER.get(subpackage(b), TOP) == TOP}
    assert not {(a, b) for a, b in subs if (b, a) in subs}, subs


def test_one_atomic_writer_and_one_head_builder():
    renames = [n for n, _, s in ALL if re.search(r"\bos\.replace\(", s)]
    assert renames == ["open_clip_starft.data.files"]
    builders = [n for n, _, s in ALL if re.search(r"\bbuild_zero_shot_classifier\(", s)]
    assert builders == ["open_clip_starft.eval.metrics"]


def test_one_all_gather():
    """Every all-gather of plain values (class ids, the step's report, evaluation scores) is method.distributed's."""
    gathers = [n for n, _, s in ALL if re.search(r"\b(all_gather|all_gather_object|allgather)\(", s)]
    assert gathers == ["open_clip_starft.method.distributed"]


def test_one_checkpoint_reader_and_one_state_dict_normaliser():
    """Weights files are read in one place (``data.weights.read_checkpoint``: safetensors or weights-only
    ``torch.load``) and DDP's ``module.`` prefix is dropped in one place (``data.weights.strip_ddp_prefix``)."""
    readers = [n for n, _, s in ALL if re.search(r"\btorch\.load\(|\bload_file\(|safe_open\(", s)]
    assert readers == ["open_clip_starft.data.weights"]
    normalisers = [n for n, _, s in ALL if re.search(r"""(removeprefix|startswith)\(\s*["']module\.|len\(["']module\.""", s)]
    assert normalisers == []  # data.weights names the prefix once, as DDP_PREFIX
    assert [n for n, _, s in ALL if "DDP_PREFIX" in s] == ["open_clip_starft.data.weights"]
