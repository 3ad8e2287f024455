"""The code a step runs, and its hash.

`python -m rm_lib <step>` executes the CLI's module-level imports and then the step module with every
rm_lib module it imports (function-level imports too). That set of files, found by reading their
imports (no import is run), is the step's code: dvc.yaml lists it as the stage's deps (a test checks),
its hash is the Dagster asset's code version, and the train step puts it in the run fingerprint so a
change to the training code starts a new run instead of resuming the old one.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # rm_lib/
ROOT = PACKAGE.parent


def _module_path(dotted: str) -> Path | None:
    base = ROOT / Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _package_inits(path: Path) -> set[Path]:
    """Importing rm_lib.steps.train runs rm_lib/__init__.py and rm_lib/steps/__init__.py first."""
    inits, folder = set(), path.parent
    while (folder / "__init__.py").exists() and ROOT in folder.parents:
        inits.add(folder / "__init__.py")
        folder = folder.parent
    return inits


# The dotted names each file imports, by its text: parsing every file of a closure again is most of
# what a step's code hash costs, and a push asks for it dozens of times. Keyed by the text, never stale.
_NAMES: dict[tuple[Path, bool], tuple[str, tuple[str, ...]]] = {}


def _imported_names(path: Path, top_level_only: bool) -> tuple[str, ...]:
    text = path.read_text(encoding="utf-8")
    cached = _NAMES.get((path, top_level_only))
    if cached is not None and cached[0] == text:
        return cached[1]
    tree = ast.parse(text)
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    found: list[str] = []
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from . import demo` imports a module
        found += [name for name in names if name.split(".")[0] == PACKAGE.name]
    names_found = tuple(dict.fromkeys(found))
    _NAMES[(path, top_level_only)] = (text, names_found)
    return names_found


def _imports(path: Path, top_level_only: bool) -> set[Path]:
    # resolved each time: a module file added or removed changes what a name imports
    return {module for name in _imported_names(path, top_level_only) if (module := _module_path(name)) is not None}


def _closure(start: set[Path], top_level_only: bool = False) -> set[Path]:
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += _imports(path, top_level_only) | _package_inits(path)
    return seen


def step_code(step: str, *, cli: bool = True) -> list[str]:
    """The files `python -m rm_lib <step>` executes (with `cli=False`: the step module and what it
    imports, as a Dagster asset runs it), relative to the project root, sorted."""
    module = PACKAGE / "steps" / f"{step}.py"
    if not module.exists():
        raise ValueError(f"no step module {module}")
    files = _closure({module})
    if cli:
        files |= _closure({PACKAGE / "__main__.py"}, top_level_only=True)
    return sorted(p.relative_to(ROOT).as_posix() for p in files)


def code_hash(step: str) -> str:
    """sha256 over the path and bytes of every file the step runs, the CLI left out (first 16 hex
    digits): the code that turns settings and data into the step's output."""
    digest = hashlib.sha256()
    for relative in step_code(step, cli=False):
        digest.update(relative.encode() + b"\0" + (ROOT / relative).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# Beside each data step's output, not in its manifest: stages downstream depend on the manifests, and an
# edit of a step's code that makes the same data (a comment) would retrain the model through them.
CODE_RECORD = "code.json"


def write_code_record(folder: Path, step: str) -> None:
    """Record in the step's output `folder` the code that made it (code_hash), for the model card's claim
    that a commit remakes the model where no dvc.lock records that code."""
    from rm_lib.files import write_json

    write_json(folder / CODE_RECORD, {"step": step, "code_hash": code_hash(step)})


def recorded_code(folder: Path) -> str | None:
    """The code hash write_code_record left in `folder`; None where none is (made before it was recorded)."""
    import json

    try:
        return json.loads((folder / CODE_RECORD).read_text(encoding="utf-8")).get("code_hash")
    except (OSError, ValueError, AttributeError):
        return None
