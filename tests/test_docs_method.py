"""docs/method.md stays true to the code: every "docs/method.md §N" cited exists, nothing
points to the design notes outside the repository, and every dotted name the page puts in
backticks is a module attribute of distill_jax or a field of the experiment config."""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# Where citations and references live (scripts/ is left to its own checks).
CITING = [
    ROOT / "README.md",
    *sorted((ROOT / "distill_jax").rglob("*.py")),
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "tests").glob("*.py")),
]


def _sections() -> set[str]:
    return set(re.findall(r"^## §(\d+) ", METHOD.read_text(), flags=re.MULTILINE))


def test_cited_sections_exist():
    cited = {}
    for path in CITING:
        for number in re.findall(r"method\.md §(\d+)", path.read_text()):
            cited.setdefault(number, path.relative_to(ROOT))
    assert {"1", "2", "3", "4"} <= _sections()
    assert cited, "nothing cites docs/method.md"
    missing = {n: str(p) for n, p in cited.items() if n not in _sections()}
    assert not missing, f"cited sections with no heading in docs/method.md: {missing}"


def test_nothing_points_outside_the_repository():
    design = "DESIGN" + ".md"  # spelled apart so that this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in CITING if design in p.read_text()]
    assert not offenders, offenders


def _resolve(dotted: str) -> bool:
    """Whether ``dotted`` is distill_jax.<module>...<attribute> (jax.<...> for JAX's own)
    or an ExperimentConfig field."""
    from distill_jax.experiment import ExperimentConfig

    parts = dotted.split(".")
    if parts[0] == "jax":  # JAX's own functions, named where the code uses them
        parts, package = parts[1:], "jax"
    else:
        package = "distill_jax"
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join([package, *parts[:split]]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
            return True
        except AttributeError:
            break
    if package == "jax":
        return False
    obj = ExperimentConfig()
    try:
        for name in parts:
            obj = getattr(obj, name)
    except AttributeError:
        return False
    return True


def _dotted_names() -> list[str]:
    names = re.findall(r"`([a-z_][a-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`", METHOD.read_text())
    return sorted({n for n in names if not n.endswith((".py", ".md", ".json"))})


def test_dotted_names_are_in_the_code():
    names = _dotted_names()
    assert len(names) > 40  # the page names the code it describes
    unknown = [n for n in names if not _resolve(n)]
    assert not unknown, f"docs/method.md names what the code does not have: {unknown}"


@pytest.mark.parametrize(
    "name, known",
    [
        ("losses.combined_loss", True),
        ("teacher.top_k", True),
        ("jax.lax.while_loop", True),
        ("jax.lax.no_such_loop", False),
        ("losses.no_such_loss", False),
    ],
)
def test_the_name_check_can_fail(name, known):
    assert _resolve(name) == known
