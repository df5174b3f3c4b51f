"""The house rules, checked on the source: imports point down the layers, and no function outgrows a screen."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lorakit"
MAX_FUNCTION_LINES = 60
# docs/architecture.md draws these layers; a module may import its own layer and the ones below.
LAYERS = {
    "errors": 0, "constants": 0, "files": 0,
    "kernels": 1,
    "quant": 2, "optim": 2, "lora": 2, "config": 2, "memory": 2, "profiling": 2, "streaming": 2, "fingerprint": 2,
    "peft_keys": 2, "vera": 2, "adalora": 2, "dora": 2,
    "adapter_types": 3, "vera_adapter": 3, "adalora_adapter": 3, "adalora_budget": 3,
    "loftq": 2, "loftq_save": 3,
    "inject": 3, "peft_format": 3, "fast_training": 3,
    "models": 4, "spectrum": 4, "hf_callback": 4,
    "train": 5, "serve": 5,
    "cli": 6, "__init__": 6, "__main__": 6,
}


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer(module_parts: tuple[str, ...]) -> int:
    """The layer of lorakit.<parts>: its top-level name's."""
    return LAYERS[module_parts[0] if module_parts else "__init__"]


def _imported(tree: ast.AST) -> set[tuple[str, ...]]:
    """lorakit modules a file imports, anywhere in it (function-level imports count too)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lorakit":
            names = [node.module] + ([f"lorakit.{a.name}" for a in node.names] if node.module == "lorakit" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "lorakit"]
        found.update(tuple(name.split(".")[1:]) for name in names)
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    own = _layer(parts)
    tree = ast.parse(path.read_text())
    upward = [".".join(m) for m in _imported(tree) if _layer(m) > own]
    assert not upward, f"{path.name} (layer {own}) imports higher layers: {upward}"
    if parts[0] in ("kernels", "quant") or parts == ("lora",):  # they know nothing of transformers
        externals = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        externals |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "transformers" not in externals or parts == ("kernels", "attention"), path


def test_kernels_import_nothing_of_lorakit_but_the_bottom_layer():
    for path in (PACKAGE / "kernels").rglob("*.py"):
        others = {m for m in _imported(ast.parse(path.read_text())) if m[0] not in ("kernels", "errors", "constants")}
        assert not others, (path.name, others)


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in _sources() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_every_module_has_a_layer():
    tops = {path.relative_to(PACKAGE).with_suffix("").parts[0] for path in _sources()}
    assert tops <= set(LAYERS), tops - set(LAYERS)


def test_every_non_python_file_of_the_package_ships_with_it():
    import fnmatch

    import tomllib

    patterns = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["lorakit"]
    data = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "the package has non-Python files (the C++ kernels)"
    missing = [path for path in data if not any(fnmatch.fnmatch(path, pattern) for pattern in shipped)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
    stale = [pattern for pattern in shipped if not any(fnmatch.fnmatch(path, pattern) for path in data)]
    assert not stale, f"package-data patterns matching nothing: {stale}"
