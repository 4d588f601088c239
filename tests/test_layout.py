"""The package's import layering: commands -> library -> models, never upwards."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "distill_jax"


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every ``distill_jax...`` module a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("distill_jax")}


def _layer(module: str) -> int:
    if module == "distill_jax.cli" or module.startswith("distill_jax.commands"):
        return 2
    if module.startswith("distill_jax.models"):
        return 0
    return 1


def test_imports_only_go_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for imported in _imported_modules(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, upward


def test_layers_are_recognised():
    """The check above sees the files it is meant to judge (a wrong path would pass it)."""
    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
    }
    assert {
        "distill_jax.cli",
        "distill_jax.commands.train_student",
        "distill_jax.student",
        "distill_jax.models.transformer",
    } <= modules
    assert _imported_modules(PACKAGE / "commands" / "train_student.py") & {"distill_jax.api"}
    assert _imported_modules(PACKAGE / "api.py") & {"distill_jax.runner"}


MAX_PARAMETERS = 8  # beyond this an object says it better (a config, options or model bundle)


def test_no_function_takes_more_than_eight_parameters():
    """Every function and method of the library (``self`` / ``cls`` not counted, ``*args``
    and ``**kwargs`` counted once each) takes at most MAX_PARAMETERS parameters."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            if names and names[0] in ("self", "cls"):
                names = names[1:]
            count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
            if count > MAX_PARAMETERS:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} {count}")
    assert not long, long
