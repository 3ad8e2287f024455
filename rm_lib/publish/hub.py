"""Publishing to the Hugging Face Hub with the real client.

The token comes from the environment (HF_TOKEN) or the user's `hf auth login`; the client reads it
itself and rm_lib never holds, prints or writes it. The endpoint is HF_ENDPOINT read at call time
(huggingface_hub reads it once, at import), so a process can point at another Hub after import.

A push is idempotent and retried whole on network trouble, 5xx/429 answers and requests that get no
answer within RM_HUB_TIMEOUT_S: see rm_lib.network for the time limit and the one retry policy.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rm_lib import network
from rm_lib.errors import UserError

DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 2.0
NAME_RULE = ("'owner/name', where the name has letters, digits, '-', '_' or '.', at most 96 characters, "
             "and neither '--' nor '..'")


class PublishError(UserError):
    """A push that failed for a reason the user can fix; the local model is kept."""


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def retry_settings() -> tuple[int, float]:
    """Tries and first back-off from RM_PUSH_RETRIES / RM_PUSH_BACKOFF_S (small in tests)."""
    try:
        retries = int(os.environ.get("RM_PUSH_RETRIES", DEFAULT_RETRIES))
        backoff = float(os.environ.get("RM_PUSH_BACKOFF_S", DEFAULT_BACKOFF_S))
    except ValueError as exc:
        raise PublishError(f"RM_PUSH_RETRIES / RM_PUSH_BACKOFF_S must be numbers ({exc})") from None
    return max(1, retries), max(0.0, backoff)


def upload(folder: Path, repo_id: str, *, private: bool, commit_message: str, tag: str,
           retries: int | None = None, backoff_s: float | None = None, kept: Path | None = None,
           named: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Create the repository if missing, make its files those of `folder` in one new revision (a file of
    an earlier release that `folder` lacks is deleted) and tag it with the run (`tag`, or `tag`-2,
    -3... when that tag already names another revision). `named(full_id)` runs before the upload, once
    the repository's full id is known (a bare name is the token owner's). Error messages say the
    model stays in `kept` (default: `folder`), for a caller that uploads from a temporary copy.

    Returns url, repo_id (with its namespace), commit and the tag given to the commit."""
    where = kept or folder
    _check_ready(where)
    network.bound_hub_client()
    default_retries, default_backoff = retry_settings()
    retries = network.tries(default_retries if retries is None else retries)
    backoff_s = default_backoff if backoff_s is None else backoff_s
    for attempt in range(1, retries + 1):
        try:
            with network.hub_retries_off():  # this loop is the one layer that retries
                return _push_once(folder, repo_id, private=private, commit_message=commit_message, tag=tag,
                                  kept=where, named=named)
        except PublishError:
            raise
        except Exception as exc:  # sorted by network.is_transient / _explain; anything unknown is re-raised
            if not network.is_transient(exc):
                _explain(exc, repo_id, where)
                raise
            if attempt == retries:
                _give_up(exc, retries, where)
            delay = backoff_s * 2 ** (attempt - 1)
            print(f"push: {_what(exc)} ({_short(exc)}); try {attempt} of {retries}, next in {delay:.1f} s",
                  file=sys.stderr, flush=True)
            _wait(delay)
    raise AssertionError("unreachable")


def _wait(seconds: float) -> None:
    time.sleep(seconds)


# ---------------------------------------------------------------- one push

def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def _push_once(folder: Path, repo_id: str, *, private: bool, commit_message: str, tag: str,
               kept: Path, named: Callable[[str], None] | None) -> dict[str, Any]:
    from huggingface_hub.errors import BadRequestError, HFValidationError

    api = _api()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except (HFValidationError, BadRequestError) as exc:  # the client's or the Hub's check of the name
        raise PublishError(f"push.repo_id: '{repo_id}' is not a valid repository name ({_short(exc)}); "
                           f"use {NAME_RULE}; the model stays in {kept}") from None
    full_id = url.repo_id or repo_id  # "name" alone lands in the token owner's namespace
    if named is not None:
        named(full_id)
    # delete_patterns: the revision holds the release and nothing of an earlier one (an adapter/ of a
    # LoRA run, a picture); the client never deletes .gitattributes
    info = api.upload_folder(repo_id=full_id, folder_path=str(folder), commit_message=commit_message,
                             repo_type="model", delete_patterns="*")
    return {"url": str(url), "repo_id": full_id, "commit": info.oid, "tag": _tag(api, full_id, info.oid, tag)}


def _tag(api: Any, repo_id: str, commit: str, base: str) -> str:
    """Tag `commit` with the run's name. Tags never move: a revision that already carries one of the
    run's tags keeps it (a push of unchanged files); a new revision of the same run gets base-2, -3..."""
    tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id, repo_type="model").tags}
    names = [base] + [f"{base}-{n}" for n in range(2, len(tags) + 3)]
    for name in names:
        if tags.get(name) == commit:
            return name
    name = next(n for n in names if n not in tags)
    api.create_tag(repo_id, tag=name, revision=commit, repo_type="model")
    return name


# ---------------------------------------------------------------- errors that say what to do

def _check_ready(folder: Path) -> None:
    from huggingface_hub import get_token

    if network.hub_offline():
        raise PublishError(f"{network.OFFLINE_ADVICE}; or set push.dry_run=true to only write the release; the "
                           f"model stays in {folder}")
    if not get_token():
        raise PublishError("no Hugging Face token: set HF_TOKEN to a token with write access, or run "
                           f"`hf auth login`; the model stays in {folder}")


_status = network.status_of


def _short(exc: BaseException) -> str:
    message = getattr(exc, "server_message", None) or str(exc) or type(exc).__name__
    return network.without_credentials(" ".join(message.split()))[:300]


def _explain(exc: BaseException, repo_id: str, folder: Path) -> None:
    """Raise a PublishError that says what to do for a refusal by the Hub; return for anything else."""
    status = _status(exc)
    if status == 401:
        raise PublishError(f"the Hub refused the token (401: {_short(exc)}): it is invalid or expired; set HF_TOKEN "
                           f"to a valid token with write access, or run `hf auth login`; the model stays in {folder}"
                           ) from None
    if status == 403:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your"
        raise PublishError(f"the token may not write to '{repo_id}' (403: {_short(exc)}): use a token with write "
                           f"access to the '{namespace}' namespace, or push to a repository of your own with "
                           f"--set push.repo_id=<you>/<name>; the model stays in {folder}") from None
    if status is not None:
        raise PublishError(f"the Hub answered {status} for '{repo_id}' ({_short(exc)}); the model stays in "
                           f"{folder}") from None


def _what(exc: BaseException) -> str:
    status, hub = _status(exc), network.without_credentials(endpoint())
    if status:
        return f"the Hub at {hub} answered {status}"
    if network.is_timeout(exc):
        return f"the Hub at {hub} did not answer within {network.timeout_s():g} s ({network.TIMEOUT_VARIABLE})"
    return f"cannot reach the Hub at {hub}"


def _give_up(exc: BaseException, retries: int, folder: Path) -> None:
    """The last try failed on a transient error: a PublishError marked transient (a caller may retry)."""
    tried = f"after {retries} {'try' if retries == 1 else 'tries'}"
    raise PublishError(f"{_what(exc)} {tried} ({_short(exc)}); retryable: check the network (and HF_ENDPOINT "
                       f"if set), then run the push step again; the model stays in {folder}",
                       transient=True) from None
