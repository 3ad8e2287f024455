"""What a release may say of the machine that made it: no folder of it.

The local report and manifests keep full paths (they are this machine's lineage); the files a push
uploads name a local model or data file by its path inside the project, or by its name alone where
it lies outside (as the LoRA adapter names its base), and the home folder as `~`.
"""
from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rm_lib.evaluation.visualize import one_line, table_cell
from rm_lib.files import where_kept

# An absolute path, whatever it holds (a newline too); a relative one that climbs out of its folder.
_ABSOLUTE = re.compile(r"^(/|~/|[A-Za-z]:[\\/])")
def _is_path(value: str) -> bool:
    """A local path: absolute, or relative and climbing out ('../data/x.jsonl', 'data/../../x', read from
    where the step ran); a relative path that does not climb (data/sources/x.jsonl, a Hub id) is shown as
    it is."""
    if _ABSOLUTE.match(value):
        return True
    normal = posixpath.normpath(value.replace("\\", "/"))
    return normal == ".." or normal.startswith("../")


def public_path(value: str, root: Path) -> str:
    """`value` as a release names it: a path inside `root` relative to it, another local path by its
    last component; a string that is no such path (a Hub id, 'demo', a URL) as it is."""
    if not _is_path(value):
        return value
    path = Path(value).expanduser()
    try:
        return where_kept(path).relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name or value


def public(value: Any, root: Path) -> Any:
    """`value` (JSON-like) with every local path made public: a string that is one, and inside longer
    text (a note) those paths and the project's and the home folder."""
    known = _longest_first(_paths(value))

    def made_public(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: made_public(v) for k, v in item.items()}
        if isinstance(item, list):
            return [made_public(v) for v in item]
        if not isinstance(item, str):
            return item
        return public_path(item, root) if _is_path(item) else _replaced(item, known, root)

    return made_public(value)


def public_text(text: str, root: Path, *sources: Any) -> str:
    """`text` (made from `sources`) with the local paths `sources` hold made public, and the project's
    and the home folder wherever else they appear."""
    return _replaced(text, _longest_first(_paths(sources)), root)


def _longest_first(paths: Iterator[str]) -> list[str]:
    return sorted(set(paths), key=len, reverse=True)  # /a/b/c before /a/b


def _replaced(text: str, paths: list[str], root: Path) -> str:
    for path in paths:
        shown = public_path(path, root)
        # as written, as the card's code spans write it (on one line, `|` escaped in a table cell) and as
        # its JSON of the settings does
        for form in (str, one_line, table_cell, _in_json):
            text = _swap(text, form(path), f"{form(shown)}/", form(shown))
    return _folders_hidden(text, root)


def _in_json(text: str) -> str:
    return json.dumps(text)[1:-1]


def _paths(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _paths(item)
    elif isinstance(value, str) and _is_path(value):
        yield value


def _folders_hidden(text: str, root: Path) -> str:
    home = Path.home()
    for folder, inside, alone in ((root, "", "."), (root.resolve(), "", "."), (home, "~/", "~"),
                                  (home.resolve(), "~/", "~")):
        if len(folder.parts) > 1:  # not '/' or '.'
            text = _swap(text, str(folder), inside, alone)
    return text


def _swap(text: str, path: str, inside: str, alone: str) -> str:
    """`path` in `text` where it stands as a path of its own (not inside a URL or a longer name): followed
    by '/' it becomes `inside` (what precedes the rest), else `alone`."""
    pattern = r"(?<![\w.:/~-])" + re.escape(path.rstrip("/")) + r"(/|(?![\w-])(?!\.\w))"
    return re.sub(pattern, lambda m: inside if m.group(1) else alone, text)
