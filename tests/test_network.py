"""Time limits on network calls and UserError.transient where each network error is raised.

The Hub push itself (a stalled Hub, the number of tries) is tested in tests/test_hub.py against the
local servers of tests/hub_server.py; here the other network calls: dataset and model resolution and
W&B's init. Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import time
import types

import httpx2
import pytest

from rm_lib import network
from rm_lib.data import sources
from rm_lib.errors import DataError, SettingsError, UserError
from rm_lib.layout import Layout
from rm_lib.model import modeling
from rm_lib.training import tracking

from helpers import run_steps, tiny_params
from hub_server import SilentServer, UnavailableServer


@pytest.fixture
def silent(monkeypatch):
    """A Hub that never answers, as the endpoint of this process's Hub client, time limit 0.5 s."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("RM_HUB_TIMEOUT_S", "0.5")
    with SilentServer() as srv:
        monkeypatch.setattr(constants, "ENDPOINT", srv.url)
        yield srv


def test_every_hub_client_request_is_time_limited(silent):
    """Also a request that asks for no limit (timeout=None), as several huggingface_hub calls do."""
    from huggingface_hub.utils import get_session

    network.bound_hub_client()
    started = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        get_session().get(f"{silent.url}/api/whoami-v2", timeout=None)
    assert time.monotonic() - started < 5 and silent.requests == ["GET /api/whoami-v2 HTTP/1.1"]


def test_the_dataset_fingerprint_gives_up_within_the_time_limit(silent):
    started = time.monotonic()
    assert sources.hub_fingerprint("someone/pairs", None) is None  # the manifest records the asked revision
    assert time.monotonic() - started < 5 and "GET /api/datasets/someone/pairs HTTP/1.1" in silent.requests


def test_a_bad_time_limit_is_a_settings_error(monkeypatch):
    monkeypatch.setenv("RM_HUB_TIMEOUT_S", "soon")
    with pytest.raises(SettingsError, match="RM_HUB_TIMEOUT_S='soon'"):
        network.timeout_s()


class HTTPError(OSError):
    def __init__(self, status: int) -> None:
        super().__init__(f"{status} Client Error")
        self.response = types.SimpleNamespace(status_code=status)


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    """`outer` as a library raises it: `raise outer from cause`."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as exc:
        return exc


DATASET_ERRORS = [  # what datasets.load_dataset raises -> transient?
    (raised_from(ConnectionError("Couldn't reach 'a/b' on the Hub (LocalEntryNotFoundError)"),
                 httpx2.ConnectError("connection refused")), True),
    (raised_from(FileNotFoundError("Dataset 'a/b' doesn't exist on the Hub"), HTTPError(503)), True),
    (raised_from(FileNotFoundError("Dataset 'a/typo' doesn't exist on the Hub"), HTTPError(404)), False),
    (ValueError("Unknown split \"trian\". Should be one of ['train', 'test']."), False),
]


@pytest.mark.parametrize(("error", "transient"), DATASET_ERRORS)
def test_hub_dataset_errors_say_whether_a_retry_can_help(error, transient, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, as the errors are

    def load_dataset(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as raised:
        list(sources.read_hub("a/b", "train", revision=None, subset=None))
    assert raised.value.transient is transient and raised.value.file == "hf://a/b"
    assert ("retryable" in str(raised.value)) is transient


@pytest.mark.parametrize(("cause", "transient"), [(HTTPError(503), True), (httpx2.ConnectError("refused"), True),
                                                 (httpx2.ReadTimeout("timed out"), True), (HTTPError(404), False)])
def test_model_config_tokenizer_and_weight_loading_errors_say_whether_a_retry_can_help(cause, transient, monkeypatch):
    """The model's config, its tokenizer and its weights load from the Hub (tokenize, train, evaluate)."""
    import transformers

    def from_pretrained(*args, **kwargs):
        raise raised_from(OSError("We couldn't connect to the Hub to load this model"), cause)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(SettingsError, match="cannot load 'someone/model'") as raised:
        modeling.load_model_config("someone/model")
    assert raised.value.transient is transient
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(SettingsError, match="cannot load a tokenizer from 'someone/model'") as raised:
        modeling.load_tokenizer("someone/model")
    assert raised.value.transient is transient
    monkeypatch.setattr(modeling, "load_model_config", lambda *a, **k: transformers.BertConfig())
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
    with pytest.raises(SettingsError, match="cannot load weights of 'someone/model'") as raised:
        modeling.load_reward_model("someone/model")
    assert raised.value.transient is transient and ("retryable" in str(raised.value)) is transient


def test_a_hub_dataset_or_model_under_offline_mode_fails_once_naming_the_setting(monkeypatch):
    """datasets words offline mode's refusal as a ConnectionError: it was read as a Hub that could not be
    reached, retryable, and Dagster retried it for minutes (make ui runs offline by default)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as raised:
        list(sources.read_hub("someone/not-cached", "train", revision=None, subset=None))
    assert not raised.value.transient and "retryable" not in str(raised.value)
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in str(raised.value)
    for load in (modeling.load_model_config, modeling.load_tokenizer):
        with pytest.raises(SettingsError, match=r"not in the local Hugging Face cache, and HF_HUB_OFFLINE") as raised:
            load("someone/not-cached")
        assert not raised.value.transient


def test_a_hub_outage_in_the_tokenize_step_is_left_to_dagsters_retries(tmp_path, monkeypatch):
    """A Hub answering 503 to every request while tokenize loads the tokenizer: the step's error is
    transient, so the asset raises it as it is for its RetryPolicy, instead of a dg.Failure without retries."""
    from huggingface_hub import constants

    from orchestration import assets

    params = tiny_params(model="someone/model")
    run_steps(params, tmp_path, "download")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("RM_HUB_TIMEOUT_S", "5")
    with UnavailableServer() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",  # file URLs: made from ENDPOINT at import
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        with pytest.raises(SettingsError, match="cannot load a tokenizer from 'someone/model'") as raised:
            assets._run_step(None, "tokenize", params, Layout(tmp_path))
    assert raised.value.transient
    assert hub.requests and all(r.split()[1].startswith(("/api/", "/someone/model/")) for r in hub.requests)
    assert not (tmp_path / "data/tokenized").exists()


def test_wandb_init_is_time_limited_and_a_timeout_is_transient(monkeypatch):
    import wandb

    monkeypatch.setenv("RM_HUB_TIMEOUT_S", "7")
    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        raise wandb.errors.CommError("Run initialization has timed out after 7.0 sec.")

    fake = types.SimpleNamespace(init=init, Settings=lambda **kw: kw, errors=wandb.errors)
    with pytest.raises(UserError, match="W&B did not start the run within 7 s") as raised:
        tracking._init_wandb(fake, mode="online", project="p")
    assert raised.value.transient and calls[0]["settings"] == {"init_timeout": 7.0}


def test_huggingface_hub_does_not_retry_under_rm_libs_retries(silent):
    """huggingface_hub retries a request 5 times, 1 to 8 s apart, on its own: under Dagster's retries (and
    rm_lib's push retries) that is a hidden second layer, and a stalled Hub would cost six time limits and
    23 s a request. Outside them (a model download from the CLI) it is the one layer, and stays."""
    from huggingface_hub.utils import http_backoff

    network.bound_hub_client()
    started = time.monotonic()
    with network.single_attempt(), pytest.raises(httpx2.ReadTimeout):
        http_backoff("GET", f"{silent.url}/api/models/someone/model")
    assert silent.requests == ["GET /api/models/someone/model HTTP/1.1"] and time.monotonic() - started < 5
    started = time.monotonic()
    with network.single_attempt(), pytest.raises(UserError):  # transformers asks for several files, each once
        modeling.load_tokenizer("someone/model")
    assert time.monotonic() - started < 20  # 53 s with huggingface_hub's retries
    assert http_backoff.__kwdefaults__["max_retries"] == 5  # outside: as huggingface_hub has it


def test_an_answer_that_trickles_is_given_up_on_after_the_time_limit(monkeypatch):
    """A byte every 0.2 s keeps every read within a 0.5 s limit: without a floor on the rate the request
    never ends (a push hung past any time limit). Past the limit, under 1 KiB/s on average is a timeout."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("RM_HUB_TIMEOUT_S", "0.5")
    network.bound_hub_client()
    with SilentServer(trickle_s=0.2) as trickle:
        started = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout, match="bytes/s") as given_up:
            get_session().get(f"{trickle.url}/api/whoami-v2")
        assert time.monotonic() - started < 3
    assert network.is_transient(given_up.value)  # retried as any timeout is


@pytest.mark.timeout(60)  # without the floor it would take 100,000 bytes x 0.2 s
def test_an_answer_that_trickles_through_a_proxy_is_given_up_on_too(monkeypatch):
    """Behind HTTPS_PROXY/HTTP_PROXY the client sends through the proxy's transport, not its own: the
    rate floor guards that one as well."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http, get_session

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("RM_HUB_TIMEOUT_S", "0.5")
    network.bound_hub_client()
    with SilentServer(trickle_s=0.2) as proxy:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        _http.close_session()  # the next client reads the proxy from the environment
        try:
            started = time.monotonic()
            with pytest.raises(httpx2.ReadTimeout, match="bytes/s"):
                get_session().get("http://hub.example/api/whoami-v2")
            assert time.monotonic() - started < 3
            assert proxy.requests == ["GET http://hub.example/api/whoami-v2 HTTP/1.1"]  # it went through the proxy
        finally:
            monkeypatch.delenv("HTTP_PROXY")
            _http.close_session()


@pytest.mark.parametrize("url, shown", [
    ("https://bob:s3cret@proxy.example/api", "https://proxy.example/api"),
    ("http://alice:s3@cret@127.0.0.1:9/x", "http://127.0.0.1:9/x"),  # an @ in the password
    ("https://bob:s3cr/et@proxy.example", "https://proxy.example"),  # a / in it (unencoded: the URL is broken)
    ("https://bob:pa?ss@proxy.example", "https://proxy.example"),
    ("https://huggingface.co/api/models/alice/rm?x=1", "https://huggingface.co/api/models/alice/rm?x=1"),
    ("https://hf-mirror.example", "https://hf-mirror.example"),
    ("'hf://datasets/acme/prefs@0123abcd/data/train-*.parquet'",  # datasets' name of a Hub file: kept whole
     "'hf://datasets/acme/prefs@0123abcd/data/train-*.parquet'"),
    ("(http://u:p@a.example/x,", "(http://a.example/x,"),
    ("hf://datasets/a/b@rev/x.parquet,https://bob:s3cret@proxy.example/api",  # joined: the URL after it too
     "hf://datasets/a/b@rev/x.parquet,https://proxy.example/api"),
])
def test_a_url_in_a_message_loses_its_user_and_password_whatever_they_hold(url, shown):
    """HF_ENDPOINT behind a proxy may carry user:password@; an error that names the endpoint shows neither,
    also where the password holds a character that breaks the URL (where it is most likely shown)."""
    assert network.without_credentials(f"cannot reach the Hub at {url} (3 tries)") == \
        f"cannot reach the Hub at {shown} (3 tries)"


def test_removing_credentials_takes_linear_time_on_a_field_of_slashes():
    """A data value of many slashes and an @ (quoted whole in its row's error) took minutes: the pattern
    scanned from every // to the end of the word."""
    import time

    started = time.perf_counter()
    assert network.without_credentials("got '" + "/" * 1_000_000 + "'@x") == "got '//x"
    assert network.without_credentials("hf://" * 200_000 + "@x").endswith("@x")  # every // after hf:, once
    assert time.perf_counter() - started < 5  # about 0.02 s; the old pattern: about 10 minutes"
