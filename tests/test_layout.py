"""The package layout is the architecture: no import cycles, and no floor imports a floor above it
(segformer_jax/__init__.py lists the floors). Every import counts, those inside functions too."""

import ast
import importlib
import pathlib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("segformer_jax", "weights_convert")

# Lowest first; a module may import modules of its own floor or lower ones.
FLOORS = [
    (
        "segformer_jax.models",
        "segformer_jax.fileio",
        "segformer_jax.xla_options",
        "segformer_jax.hugepages",
        "segformer_jax._moved",
    ),
    ("segformer_jax.data",),
    ("weights_convert", "segformer_jax.pretrained"),
    ("segformer_jax.inference",),
    ("segformer_jax.evaluation",),
    ("segformer_jax.training",),
    ("segformer_jax.deploy",),
    (
        "segformer_jax.predict",
        "segformer_jax.evaluate",
        "segformer_jax.quantize",
        "segformer_jax.export",
        "weights_convert.__main__",
        "segformer_jax",
    ),
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules imported by `name` (resolved to modules, not attributes)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph():
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _floor(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no floor of tests/test_layout.py: add it"
    return level


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    # Package __init__ files that re-export their own submodules are the package's facade, not a cycle.
    graph = {
        m: {t for t in ts if not (t.startswith(m + ".") and _modules()[m].name == "__init__.py")}
        for m, ts in graph.items()
    }
    assert _cycles(graph) == []


def test_cycle_detector_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_floor_imports_a_higher_floor():
    graph = _graph()
    assert "segformer_jax.evaluation.metrics" in graph["segformer_jax.training.steps"]  # the walk sees imports
    assert "segformer_jax.pretrained" in graph["segformer_jax.training.state"]  # ... inside functions too
    bad = [
        f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if _floor(t) > _floor(m)
    ]
    assert bad == []


def test_every_package_says_what_it_holds_and_may_import():
    for init in sorted((ROOT / "segformer_jax").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)}: docstring must say what it may import"
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert module.name in doc, f"{init.relative_to(ROOT)}: docstring does not list {module.name}"


@pytest.mark.parametrize(
    "old, new",
    [
        ("segformer_jax.config", "segformer_jax.models.config"),
        ("segformer_jax.kernels", "segformer_jax.models.kernels"),
        ("segformer_jax.metrics", "segformer_jax.evaluation.metrics"),
    ],
)
def test_old_module_paths_warn_and_are_the_new_modules(old, new):
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new


def test_quantize_cli_module_forwards_the_old_api():
    from segformer_jax import quantize
    from segformer_jax.deploy import quantize as new

    with pytest.warns(DeprecationWarning, match="segformer_jax.deploy.quantize.load_quantized"):
        assert quantize.load_quantized is new.load_quantized
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(quantize.main)  # the CLI itself is no deprecated path
