"""Time limits on every network call, and the retry policy, written down once here.

Time limit: every HTTP request made through huggingface_hub's shared client waits at most
RM_HUB_TIMEOUT_S seconds (default 60) to connect and for each read or write, and an answer still
coming after that long at under 1 KiB/s on average is given up on too (a byte now and then would
reset a per-read limit for ever). That client carries
the push (HfApi: its uploads take the LFS path, see xet_off), the dataset resolution of
`datasets.load_dataset` and `hub_fingerprint`, and the model resolution of transformers. A model file
kept in Xet storage downloads through hf_xet's own client, with its own limits (HF_XET_CLIENT_READ_TIMEOUT,
retries for up to HF_XET_CLIENT_RETRY_MAX_DURATION), not this one's. W&B's init waits as long (its
`init_timeout`). A request that gets no answer in time ends in a UserError with `transient=True`, the
same as a closed port.

Retries: exactly one layer retries a transient error (UserError.transient).
- The CLI, `dvc repro` and any Python caller: rm_lib itself. A push is tried RM_PUSH_RETRIES times
  in all (default 3), waiting RM_PUSH_BACKOFF_S seconds (default 2) before the second and twice as
  long before each next one. A non-transient error is never retried.
- Dagster: the asset's RetryPolicy (orchestration.assets.NETWORK_RETRY, 4 tries in all, about 30 s,
  90 s and 210 s apart), on every asset whose step may reach the network, for a transient error only.
  The asset runs its step inside `single_attempt()` (a training it launches as its own process too),
  so rm_lib tries once.
huggingface_hub's own retries (5 of each request, 1 to 8 s apart) are off under both (`hub_retries_off`):
no request is retried under them. A model or dataset download from the CLI or `dvc repro`, which rm_lib
does not retry, keeps them: there they are the one layer.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from rm_lib.errors import SettingsError

# the user:password@ of a URL (an HF_ENDPOINT behind a proxy may carry one): never in a message. From a word's
# first // to its last @: a password may hold an @, or a / or ? that breaks the URL (when it is most likely
# printed). An @ in a path (rare in an endpoint) takes the host with it: a message may say less, never a
# secret. One pass over each word (a regex from every // to an @ took quadratic time on a field of slashes).
_WORD = re.compile(r"\S+")
# hf://datasets/<repo>@<revision>/... (how `datasets` names Hub files): a revision, no credentials
_NO_USERINFO_SCHEMES = ("hf:",)


def _word_without_credentials(match: re.Match) -> str:
    word = match.group()
    lower = word.lower()
    start = word.find("//")
    while start >= 0 and lower.endswith(_NO_USERINFO_SCHEMES, 0, start):  # a URL may follow, joined by a ,
        start = word.find("//", start + 2)
    at = word.rfind("@")
    if start < 0 or at < start:
        return word
    return word[:start + 2] + word[at + 1:]


def without_credentials(text: str) -> str:
    """`text` with the credentials of every URL in it removed."""
    if "//" not in text or "@" not in text:
        return text
    return _WORD.sub(_word_without_credentials, text)


def first_line(exc: BaseException, limit: int | None = 300) -> str:
    """The first line of an error's message (its type's name where it has none), at most `limit`
    characters, without the credentials of a URL it names: what a one-line error quotes of a library's."""
    line = without_credentials((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    return line if limit is None else line[:limit]


# the libraries that log the URLs they request (huggingface_hub's retries: "HTTP Error 500 thrown while
# requesting HEAD <url>")
_LOGGING_LIBRARIES = ("huggingface_hub", "datasets", "transformers", "httpx", "httpx2", "fsspec")
_records_cleaned = False


def _log_records_without_credentials() -> None:
    """Every log record those libraries make says its URLs without credentials, whatever handler shows it
    (their own, the root logger's, Dagster's): the record is cleaned where it is made."""
    global _records_cleaned
    if _records_cleaned:
        return
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if isinstance(record.name, str) and record.name.split(".", 1)[0] in _LOGGING_LIBRARIES:  # makeLogRecord: None
            try:
                said = record.getMessage()
            except Exception:  # a record its own handler could not format either: left to it
                return record
            cleaned = without_credentials(said)
            if cleaned != said:
                record.msg, record.args = cleaned, None
        return record

    logging.setLogRecordFactory(factory)
    _records_cleaned = True


DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_VARIABLE = "RM_HUB_TIMEOUT_S"

_SINGLE_ATTEMPT: contextvars.ContextVar[bool] = contextvars.ContextVar("rm_single_attempt", default=False)
_installed = False


def timeout_s() -> float:
    """The time limit of one request, in seconds (RM_HUB_TIMEOUT_S, read at each request)."""
    raw = os.environ.get(TIMEOUT_VARIABLE)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SettingsError(f"{TIMEOUT_VARIABLE}={raw!r}: expected a number of seconds above 0")
    return value


@contextlib.contextmanager
def single_attempt() -> Iterator[None]:
    """Inside: rm_lib and huggingface_hub try each network operation once; the caller's own retry
    policy does the rest."""
    token = _SINGLE_ATTEMPT.set(True)
    try:
        with hub_retries_off():
            yield
    finally:
        _SINGLE_ATTEMPT.reset(token)


def in_single_attempt() -> bool:
    """Whether the caller's own retry policy retries (inside `single_attempt()`: Dagster's)."""
    return _SINGLE_ATTEMPT.get()


def tries(configured: int) -> int:
    """How many times rm_lib itself tries: `configured`, or 1 inside `single_attempt()`."""
    return 1 if in_single_attempt() else max(1, configured)


def _fill_timeouts(request: Any) -> None:
    """A request hook: no phase of a request waits longer than the time limit, also where the
    caller passed timeout=None. A shorter limit the caller chose (the client's 10 s for file
    metadata, say) is kept."""
    limits = dict(request.extensions.get("timeout") or {})
    limit = timeout_s()
    for phase in ("connect", "read", "write", "pool"):
        given = limits.get(phase)
        limits[phase] = limit if given is None else min(given, limit)
    request.extensions = {**request.extensions, "timeout": limits}


# An answer that keeps a connection busy with a byte now and then never trips the per-read limit: past
# the time limit, a body that has come slower than this on average is given up on as a timeout.
MIN_BYTES_PER_S = 1024


def _rate_floor(inner: Any, limit: float, request: Any) -> Any:
    """A response body stream that raises ReadTimeout once it is older than `limit` seconds and has
    averaged under MIN_BYTES_PER_S."""
    import httpx2

    class RateFloor(httpx2.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            started, received = time.monotonic(), 0
            for chunk in inner:
                received += len(chunk)
                elapsed = time.monotonic() - started
                if elapsed > limit and received < MIN_BYTES_PER_S * elapsed:
                    raise httpx2.ReadTimeout(f"the answer came at {received / elapsed:.0f} bytes/s for {elapsed:.0f} s "
                                             f"(RM_HUB_TIMEOUT_S={limit:g})", request=request)
                yield chunk

        def close(self) -> None:
            inner.close()

    return RateFloor()


def _guarded(transport: Any) -> Any:
    """`transport`, with every response body streaming through _rate_floor."""
    import httpx2

    class Guarded(httpx2.BaseTransport):
        def handle_request(self, request: Any) -> Any:
            response = transport.handle_request(request)
            response.stream = _rate_floor(response.stream, timeout_s(), request)
            return response

        def close(self) -> None:
            transport.close()

    return Guarded()


def _guard_transport(client: Any) -> None:
    """Guard every transport the client sends through: its own, and the proxies' it mounted from
    HTTPS_PROXY/HTTP_PROXY/ALL_PROXY (a request behind a proxy never reaches its own)."""
    client._transport = _guarded(client._transport)
    for pattern, transport in list(client._mounts.items()):
        if transport is not None:
            client._mounts[pattern] = _guarded(transport)


def bound_hub_client() -> None:
    """Make huggingface_hub's shared HTTP client time-limit every request (once per process).

    The client is created with `timeout=None` and several calls pass `timeout=None` explicitly,
    which a client-wide default would not override; a request hook sees every request. The libraries' log
    records say no URL's credentials from then on."""
    global _installed
    timeout_s()  # a bad RM_HUB_TIMEOUT_S fails here, before any request
    _log_records_without_credentials()
    if _installed:
        return
    from huggingface_hub.utils import _http

    def factory() -> Any:
        client = _http.default_client_factory()
        client.event_hooks["request"].append(_fill_timeouts)
        _guard_transport(client)
        return client

    _http.set_client_factory(factory)
    _installed = True


@contextlib.contextmanager
def hub_retries_off() -> Iterator[None]:
    """Inside: huggingface_hub tries each request once. It retries on its own (5 times, 1 to 8 s apart):
    under a layer that retries already (rm_lib's push, Dagster's RetryPolicy) that is a second, hidden
    one, and a stalled Hub costs six time limits and 23 s a request instead of one time limit."""
    from huggingface_hub.utils import _http

    defaults = [getattr(f, "__wrapped__", f).__kwdefaults__ for f in (_http.http_backoff, _http.http_stream_backoff)]
    before = [d["max_retries"] for d in defaults]
    for d in defaults:
        d["max_retries"] = 0
    try:
        yield
    finally:
        for d, value in zip(defaults, before):
            d["max_retries"] = value


@contextlib.contextmanager
def xet_off() -> Iterator[None]:
    """Inside: huggingface_hub uploads through the Hub's Git LFS path, which the Hub takes into a Xet-backed
    repository too, and so through the time-limited HTTP client. With hf_xet installed it uploads by
    hf_xet's own client (Rust), which neither hook nor RM_HUB_TIMEOUT_S reaches, and which retries on its
    own for minutes: a storage server that took the connection and never answered hung a push for good."""
    from huggingface_hub import constants

    before = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = before


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection trouble as the HTTP libraries raise it (httpx2 in huggingface_hub 2.x)."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            kinds.append(__import__(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


def status_of(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def is_timeout(exc: BaseException) -> bool:
    """No answer within the time limit (httpx's TimeoutException, or a plain TimeoutError)."""
    return isinstance(exc, TimeoutError) or any(type(e).__name__.endswith("Timeout") for e in _chain(exc))


OFFLINE_ADVICE = ("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing is fetched from the Hub: set it to 0 "
                  "to reach it (`make` sets it to 1 unless given)")


def hub_offline() -> bool:
    """huggingface_hub's offline mode is on: a load that needs the Hub fails at once, and again if tried again."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def is_offline_refusal(exc: BaseException) -> bool:
    """The client refused to send a request, offline mode being on (datasets words it as a ConnectionError)."""
    return any(type(link).__name__ == "OfflineModeIsEnabled" or "OfflineModeIsEnabled" in str(link)
               for link in _chain(exc))


def is_transient(exc: BaseException) -> bool:
    """Worth the same call again later: 5xx, 429 or 408 answers, no connection, no answer in time. Not
    a request offline mode kept from being sent: the same call fails the same way until it is unset."""
    if is_offline_refusal(exc):
        return False
    for link in _chain(exc):
        status = status_of(link)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(link, _transport_errors()):
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """The error and the errors it was raised from (libraries often wrap the HTTP error)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen
