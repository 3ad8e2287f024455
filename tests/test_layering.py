"""The import rule of the README's code map: rm_lib is the library and imports no front-end (no
orchestration, no Dagster) and never DVC (its pinned parser runtime breaks Dagster's selection parser:
DVC runs as a command). orchestration may import rm_lib."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_RM_LIB = ("orchestration", "dagster", "dagster_webserver", "dvc")


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_rm_lib_imports_no_front_end_and_never_dvc():
    offenders = {str(p.relative_to(ROOT)): sorted(_imported(p) & set(FORBIDDEN_IN_RM_LIB))
                 for p in (ROOT / "rm_lib").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_orchestration_never_imports_dvc():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "orchestration").rglob("*.py") if "dvc" in _imported(p)]
    assert not offenders


# The groups of rm_lib in data-flow order (README's code map): a module imports only from its own group
# and the groups before it.
GROUPS = ("foundation", "model", "data", "training", "evaluation", "publish", "pipeline", "steps", "front-end")


def _group(module: Path) -> str:
    parts = module.relative_to(ROOT / "rm_lib").parts
    if len(parts) > 1:
        return parts[0]
    return "front-end" if parts[0] in ("cli.py", "__main__.py") else "foundation"


def test_each_group_imports_only_from_itself_and_the_groups_before_it():
    from rm_lib.pipeline.code_version import _imports

    assert {p.name for p in (ROOT / "rm_lib").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        GROUPS) - {"foundation", "front-end"}
    wrong = []
    for path in (ROOT / "rm_lib").rglob("*.py"):
        mine = GROUPS.index(_group(path))
        for target in _imports(path, top_level_only=False):
            if GROUPS.index(_group(target)) > mine:
                wrong.append(f"{path.relative_to(ROOT)} imports {target.relative_to(ROOT)}")
    assert not wrong, wrong
