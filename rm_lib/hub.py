"""Publishing to the Hugging Face Hub with the real client. The token comes from the
environment (HF_TOKEN) or the user's `hf auth login`, and is never written anywhere."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .errors import UserError


class PublishError(UserError):
    """A push that failed for a reason the user can fix; the local model is kept."""


def upload(folder: Path, repo_id: str, *, private: bool, commit_message: str, tag: str | None = None,
           retries: int = 3, backoff_s: float = 2.0) -> dict[str, Any]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    api = HfApi()
    for attempt in range(1, retries + 1):
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                     repo_type="model")
            if tag:
                api.create_tag(repo_id, tag=tag, revision=info.oid, exist_ok=True)
            return {"url": str(url), "commit": info.oid, "tag": tag}
        except HFValidationError as exc:
            raise PublishError(f"push.repo_id: '{repo_id}' is not a valid repository name ({exc})") from None
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status == 401:
                raise PublishError("the Hub refused the token: set HF_TOKEN or run `hf auth login`; "
                                   f"the model stays in {folder}") from None
            if status == 403:
                raise PublishError(f"the token may not write to '{repo_id}': use a token with write access "
                                   f"to that namespace; the model stays in {folder}") from None
            if status is not None and status < 500 or attempt == retries:
                raise PublishError(f"the Hub answered {status} ({exc}); the model stays in {folder}") from None
        except OSError as exc:  # network down: connection refused, DNS, timeouts
            if attempt == retries:
                raise PublishError(f"cannot reach the Hub after {retries} tries ({exc}); check the network "
                                   f"and run the push step again; the model stays in {folder}") from None
        time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
