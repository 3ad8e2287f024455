"""Publishing to the Hugging Face Hub with the real client.

The token comes from the environment (HF_TOKEN) or the user's `hf auth login`; the client reads it
itself and rm_lib never holds, prints or writes it. The endpoint is HF_ENDPOINT read at call time
(huggingface_hub reads it once, at import), so a process can point at another Hub after import.

A push is idempotent: its upload, then its tag, each retried whole on network trouble, 5xx/429 answers
and requests that get no answer within RM_HUB_TIMEOUT_S: see rm_lib.network for the time limit and the one retry policy.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


@dataclass(frozen=True)
class HubRelease:
    """What a repository holds at the moment a push reads it."""

    repo_id: str  # with its namespace
    commit: str | None  # the head of its main branch; None: no such repository yet
    private: bool | None
    folder: Path  # the head's evaluation.json and README.md, where it has them: what the release gate reads
    files: tuple[str, ...] = ()  # the head's files, .gitattributes aside

    @property
    def holds_release(self) -> bool:
        """Whether the head is a release of this project (an evaluation.json as push writes it)."""
        return (self.folder / "evaluation.json").is_file()


RELEASE_FILES = ("evaluation.json", "README.md")


def current_release(repo_id: str, into: Path, *, kept: Path) -> HubRelease:
    """The release `repo_id` holds now, its files the gate reads written into `into`: the bar a push must
    clear is what the Hub holds, which another clone or an experiment may have pushed since this
    folder's data/release. Retried as `upload` is."""
    _check_ready(kept)
    network.bound_hub_client()
    return _retrying(lambda: _read_release(repo_id, into, kept), repo_id, kept)


def upload(folder: Path, repo_id: str, *, private: bool, commit_message: str, tag: str,
           retries: int | None = None, backoff_s: float | None = None, kept: Path | None = None,
           named: Callable[[str], None] | None = None, parent_commit: str | None = None) -> dict[str, Any]:
    """Create the repository if missing, make its files those of `folder` in one new revision (a file of
    an earlier release that `folder` lacks is deleted; no revision where the head holds them already) and
    tag it with the run (`tag`, or `tag`-2, -3... when that tag already names another revision). Under
    `network.single_attempt()` a transient failure of the tag is raised, for the caller's retry policy.
    `named(full_id)` runs before the upload, once
    the repository's full id is known (a bare name is the token owner's). `parent_commit`: the head the
    release gate judged against; a repository that moved on since refuses the revision. Error messages
    say the model stays in `kept` (default: `folder`), for a caller that uploads from a temporary copy.

    Returns url, repo_id (with its namespace), commit, the tag given to the commit and, where the revision
    landed but could not be tagged, tag None and `tag_error`: the release is published all the same (a
    failure then said "run the push step again" of a revision the Hub held, and data/release kept the
    last one)."""
    where = kept or folder
    _check_ready(where)
    network.bound_hub_client()
    with network.xet_off():
        info = _retrying(lambda: _push_once(folder, repo_id, private=private, commit_message=commit_message,
                                            kept=where, named=named, parent_commit=parent_commit),
                         repo_id, where, retries, backoff_s)
        try:
            info["tag"] = _retrying(lambda: _tag(_api(), info["repo_id"], info["commit"], tag), repo_id, where,
                                    retries, backoff_s)
        except PublishError as exc:
            if exc.transient and network.in_single_attempt():  # Dagster's RetryPolicy: the push again tags it
                raise
            info["tag"], info["tag_error"] = None, str(exc).split(f"; the model stays in {where}")[0]
        except Exception as exc:  # noqa: BLE001 - one _explain does not know: the revision landed all the same
            info["tag"], info["tag_error"] = None, network.first_line(exc)
    return info


def _retrying(action: Callable[[], Any], repo_id: str, where: Path, retries: int | None = None,
              backoff_s: float | None = None) -> Any:
    """`action` again on network trouble (network.is_transient), with a doubling wait; a refusal by the
    Hub is a PublishError that says what to do."""
    default_retries, default_backoff = retry_settings()
    retries = network.tries(default_retries if retries is None else retries)
    backoff_s = default_backoff if backoff_s is None else backoff_s
    for attempt in range(1, retries + 1):
        try:
            with network.hub_retries_off():  # this loop is the one layer that retries
                return action()
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


def _read_release(repo_id: str, into: Path, kept: Path) -> HubRelease:
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    api = _api()
    full_id = repo_id if "/" in repo_id else f"{api.whoami()['name']}/{repo_id}"  # as create_repo places it
    try:
        info = api.repo_info(full_id, repo_type="model")
    except RepositoryNotFoundError:
        return HubRelease(full_id, None, None, into)
    except HFValidationError as exc:
        raise _bad_name(repo_id, exc, kept) from None
    names = {sibling.rfilename for sibling in info.siblings or ()}
    files = tuple(sorted(names - {".gitattributes"}))
    for name in RELEASE_FILES:
        (into / name).unlink(missing_ok=True)  # a try that failed half way left the other's
    evaluation = _read_file(full_id, "evaluation.json", info.sha) if "evaluation.json" in names else None
    if evaluation is None or not _is_release(evaluation):
        return HubRelease(full_id, info.sha, bool(info.private), into, files=files)  # no bar: no release of ours
    (into / "evaluation.json").write_bytes(evaluation)
    if "README.md" in names:
        (into / "README.md").write_bytes(_read_file(full_id, "README.md", info.sha))
    return HubRelease(full_id, info.sha, bool(info.private), into, files=files)


def _is_release(evaluation: bytes) -> bool:
    """An evaluation.json as this project's push writes it (the gate reads these keys); a repository's
    file of the same name from elsewhere is no bar."""
    try:
        record = json.loads(evaluation)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python reads
        return False
    return (isinstance(record, dict) and isinstance(record.get("accuracy"), (int, float))
            and not isinstance(record.get("accuracy"), bool)
            and all(isinstance(record.get(key) or {}, dict) for key in ("inputs", "test_data", "judged_against")))


def foreign_files_refusal(on_hub: HubRelease, kept: Path) -> PublishError | None:
    """A repository whose head holds files and no release of this project (another model's weights, a
    typo in push.repo_id): a push makes the repository's files the release's, and deleted that model's
    without a word. A lone README.md (the Hub's page of a new repository) is replaced."""
    others = [name for name in on_hub.files if name != "README.md"]
    if on_hub.holds_release or not others:
        return None
    listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return PublishError(f"'{on_hub.repo_id}' holds files that are no release of this project ({listed}): a push "
                        "makes the repository's files this release's and would delete them; push to another "
                        "repository (push.repo_id), or remove those files on the Hub first; nothing uploaded, "
                        f"the model stays in {kept}")


def visibility_refusal(repo_id: str, kept: Path) -> PublishError:
    return PublishError(f"push.private is true, but {repo_id} is public on the Hub: this release would be public. "
                        "Make the repository private in its settings on the Hub, or set push.private=false to "
                        f"publish it openly; nothing uploaded, the model stays in {kept}")


def _read_file(repo_id: str, name: str, revision: str) -> bytes:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint())
    response = get_session().get(url, headers=build_hf_headers(), follow_redirects=True)
    hf_raise_for_status(response)
    return response.content


def _bad_name(repo_id: str, exc: BaseException, kept: Path) -> PublishError:
    return PublishError(f"push.repo_id: '{repo_id}' is not a valid repository name ({_short(exc)}); "
                        f"use {NAME_RULE}; the model stays in {kept}")


def _push_once(folder: Path, repo_id: str, *, private: bool, commit_message: str,
               kept: Path, named: Callable[[str], None] | None, parent_commit: str | None) -> dict[str, Any]:
    from huggingface_hub.errors import BadRequestError, HFValidationError

    api = _api()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except (HFValidationError, BadRequestError) as exc:  # the client's or the Hub's check of the name
        raise _bad_name(repo_id, exc, kept) from None
    full_id = url.repo_id or repo_id  # "name" alone lands in the token owner's namespace
    if named is not None:
        named(full_id)
    if parent_commit is None:  # no repository when the gate read the Hub: the one that is there now
        info = api.repo_info(full_id, repo_type="model")
        if private and info.private is False:  # another made it, public, in between
            raise visibility_refusal(full_id, kept)
        if {sibling.rfilename for sibling in info.siblings or ()} - {".gitattributes"}:
            commit = _ours_at_head(api, full_id, folder)  # this push's own, from a try whose answer was lost
            if commit is None:
                raise _landed_or_moved_on(api, full_id, folder, None, kept)
            return {"url": str(url), "repo_id": full_id, "commit": commit}
        parent_commit = info.sha
    # delete_patterns: the revision holds the release and nothing of an earlier one (an adapter/ of a
    # LoRA run, a picture); the client never deletes .gitattributes
    try:
        commit = api.upload_folder(repo_id=full_id, folder_path=str(folder), commit_message=commit_message,
                                   repo_type="model", delete_patterns="*", parent_commit=parent_commit).oid
    except Exception as exc:
        if network.status_of(exc) != 412:
            raise
        commit = _ours_at_head(api, full_id, folder)  # a try whose answer was lost may have made it
        if commit is None:
            raise _landed_or_moved_on(api, full_id, folder, parent_commit, kept) from None
    return {"url": str(url), "repo_id": full_id, "commit": commit}


def _landed_or_moved_on(api: Any, repo_id: str, folder: Path, since: str | None, kept: Path) -> PublishError:
    """The repository's head is not this release: another's revision, on top of this one's where a try
    whose answer was lost made it (its history after `since`, the head the gate read; all of it for a
    repository the gate found missing)."""
    landed = _ours_since(api, repo_id, folder, since)
    if landed is None:
        return _moved_on(repo_id, kept)
    return PublishError(f"this model's release landed on '{repo_id}' as revision {landed}, but a push from "
                        "elsewhere (another clone, a DVC experiment) made a newer revision on top of it before the "
                        "Hub's answer came: the Hub's head is not this model, and data/release is unchanged; run the "
                        "push step again to judge this model against the release the Hub holds now; the model "
                        f"stays in {kept}")


def _moved_on(repo_id: str, kept: Path) -> PublishError:
    return PublishError(f"'{repo_id}' has a new revision since the release gate read it (a push from another "
                        "clone, or a DVC experiment): nothing uploaded; run the push step again to judge this model "
                        f"against the release it holds now; the model stays in {kept}")


def _ours_at_head(api: Any, repo_id: str, folder: Path) -> str | None:
    """The head commit where it holds this release (its evaluation.json, byte for byte), else None."""
    head = api.repo_info(repo_id, repo_type="model").sha
    try:
        theirs = _read_file(repo_id, "evaluation.json", head)
    except Exception as exc:
        if network.status_of(exc) == 404:
            return None
        raise
    return head if theirs == (folder / "evaluation.json").read_bytes() else None


def _ours_since(api: Any, repo_id: str, folder: Path, since: str | None) -> str | None:
    """The revision after `since` (the head the gate read) that holds this release, where one does: a try
    whose answer was lost, with another's revision on top of it."""
    ours = (folder / "evaluation.json").read_bytes()
    for commit in api.list_repo_commits(repo_id, repo_type="model"):  # newest first
        if commit.commit_id == since:
            return None
        try:
            if _read_file(repo_id, "evaluation.json", commit.commit_id) == ours:
                return commit.commit_id
        except Exception as exc:
            if network.status_of(exc) != 404:
                raise
    return None


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
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN to a token with write access, or run "
                           f"`hf auth login`; the model stays in {folder}")
    if not token.isascii():  # the client cannot send it (a traceback of the header's encoding)
        raise PublishError("the Hugging Face token holds a character that is not ASCII, which no token has (a "
                           "character pasted with it?): set HF_TOKEN again, or run `hf auth login`; the model "
                           f"stays in {folder}")


_status = network.status_of


def _short(exc: BaseException) -> str:
    message = getattr(exc, "server_message", None) or str(exc) or type(exc).__name__
    return network.without_credentials(" ".join(message.split()))[:300]


def _explain(exc: BaseException, repo_id: str, folder: Path) -> None:
    """Raise a PublishError that says what to do for a refusal by the Hub, or an answer that is not the
    Hub's; return for anything else."""
    status = _status(exc)
    hub = network.without_credentials(endpoint())
    if isinstance(exc, json.JSONDecodeError):  # a proxy's login page, a web server that is not a Hub
        raise PublishError(f"the Hub at {hub} answered with something other than the Hub's JSON ({_short(exc)}): "
                           f"check HF_ENDPOINT, and any proxy between; the model stays in {folder}") from None
    if status == 401:
        userinfo = "@" in urlsplit(endpoint()).netloc
        cause = ("HF_ENDPOINT carries a user and password, which the client sends instead of the token: take "
                 "them out of it" if userinfo else "it is invalid or expired; set HF_TOKEN to a valid token with "
                 "write access, or run `hf auth login`")
        raise PublishError(f"the Hub refused the token (401: {_short(exc)}): {cause}; the model stays in {folder}"
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
