"""Which prompts a reward model trained on, its base models' included, and which held-out pairs ask one.

The seeded split keeps every prompt on one side, but only within one run. A model trained on from a
reward model of this project (model.name_or_path: its folder, release or Hub repository) carries what that base
learned: where the base's training pairs held a prompt the new run holds out (another seed or
test_fraction, another source that shares prompts, the split of an older rm_lib), the held-out accuracy
is partly of pairs the model has seen. So tokenize digests each pair's prompt as the split groups it
(rm_lib.data.keys.prompt_keys, then keys.digest), train writes its training pairs' digests into the model
folder with those of its bases, and evaluate counts the held-out pairs among them.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rm_lib.data.keys import DIGEST_CHARS
from rm_lib.errors import DataError

FILE = "trained_prompts.json"
FORMAT = 1
SEEN = "seen_in_training"  # report.json's key for `overlap`


def record(rows: list[dict], base: dict | None, base_name: str) -> dict:
    """The model's trained_prompts.json: its own training rows' prompt digests, and the bases' as `base`
    (the base's own record, or None) holds them. `own` is None where the rows carry no digests
    (data/filtered made by an earlier rm_lib): nothing is claimed of them."""
    digests = [row.get("prompt_digest") for row in rows]
    own = None if any(d is None for d in digests) else sorted(set(digests))
    bases: set[str] = set()
    unrecorded: list[str] = []
    if base is not None:
        bases = set(base.get("own") or []) | set(base.get("bases") or [])
        unrecorded = list(base.get("unrecorded_bases") or [])
        if base.get("own") is None:
            unrecorded.append(base_name)
    return {"format": FORMAT, "digest": f"sha256[:{DIGEST_CHARS}] of the prompt's key (rm_lib.data.keys.prompt_keys)",
            "own": own, "bases": sorted(bases - set(own or [])), "unrecorded_bases": sorted(set(unrecorded))}


def unrecorded() -> dict:
    """The record a base without trained_prompts.json stands for: a reward model of this project trained
    by an earlier rm_lib, or one whose record could not be fetched."""
    return {"own": None, "bases": [], "unrecorded_bases": []}


def read(folder: Path) -> dict | None:
    """`folder`'s trained_prompts.json; None where it has none. A damaged one is a DataError naming it."""
    path = folder / FILE
    if not path.is_file():
        return None
    return parse(path.read_bytes(), str(path))


def parse(raw: bytes, where: str) -> dict:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep to read
        raise DataError(f"not valid JSON ({exc}); train writes it: train the model again", file=where) from None
    if not isinstance(value, dict):
        raise DataError(f"expected an object, got {type(value).__name__}", file=where)
    for key in ("own", "bases", "unrecorded_bases"):
        listed = value.get(key)
        if listed is None and key == "own":
            continue
        if not isinstance(listed, list) or not all(isinstance(d, str) for d in listed):
            raise DataError("expected a list of strings" + (" or null" if key == "own" else ""), file=where, field=key)
    return value


def base_record(name_or_path: str, folder: Path | None, is_reward_model: bool,
                revision: str | None = None) -> dict | None:
    """The record of the base model a run trains on from: its trained_prompts.json, from its folder or
    (a release of this project on the Hub) fetched from there; `unrecorded` where it is a reward model of
    this project without one (`is_reward_model`: it has an rm_lib.json, or its config names a run of
    this project); None for any other base, which trained on no preference pairs of ours."""
    if folder is not None:
        found = read(folder)
        return found if found is not None else unrecorded() if is_reward_model else None
    if not is_reward_model:
        return None
    fetched = _from_hub(name_or_path, revision)
    return fetched if fetched is not None else unrecorded()


def _from_hub(repo_id: str, revision: str | None) -> dict | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:  # the base's weights loaded from there a moment ago: the repository exists and the Hub answered
        path = Path(hf_hub_download(repo_id, FILE, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
        kind = "offline, and not cached" if isinstance(exc, LocalEntryNotFoundError) else "it has none"
        print(f"note: {repo_id}: its training prompts ({FILE}) cannot be read ({kind}): evaluate cannot tell "
              "which held-out pairs it trained on", file=sys.stderr)
        return None
    return parse(path.read_bytes(), f"{repo_id}: {FILE}")


def overlap(digests: Iterable[str | None], trained: dict | None) -> dict[str, Any]:
    """The held-out pairs (their prompt digests, in order) whose prompt the model trained on: `own` (its
    own training pairs: none under the seeded split; a source's own split may share some) and `base`
    (a base model's, not its own). `checked` False where the model or the pairs carry no record."""
    digests = list(digests)
    if trained is None or trained.get("own") is None or any(d is None for d in digests):
        why = ("the held-out pairs carry no prompt digests (data/filtered made by an earlier rm_lib)"
               if any(d is None for d in digests) else f"the model has no record of its training prompts ({FILE})")
        return {"checked": False, "why": why, "unrecorded_bases": list((trained or {}).get("unrecorded_bases") or [])}
    own, bases = set(trained["own"]), set(trained.get("bases") or [])
    by_own = [i for i, d in enumerate(digests) if d in own]
    by_base = [i for i, d in enumerate(digests) if d not in own and d in bases]
    return {"checked": True, "pairs": len(digests), "own": len(by_own), "base": len(by_base),
            "share_base": len(by_base) / len(digests) if digests else 0.0,
            "unrecorded_bases": list(trained.get("unrecorded_bases") or []),
            "seen_rows": sorted(by_own + by_base)}


def seen_phrase(seen: dict, rows: int) -> str:
    """A suite's rows that ask a prompt the model trained on (evaluation.suites.seen_rows), in words: for the
    summary and the card."""
    others = seen.get("accuracy_unseen")
    return (f"{seen['rows']} of {rows} rows ask a prompt the model (or a base it trained on from) trained on ("
            + (f"accuracy on the others {others:.4f})" if others is not None else "no others)"))
