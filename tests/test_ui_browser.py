"""The Dagster UI in a real browser: `dagster dev`, started as the Makefile's `ui` target starts it,
serves the asset graph with the six assets; a headless Chromium (Debian's, driven by Playwright)
selects the three data assets, launches their materialization and sees the run succeed.

Offline and small: a temporary project folder whose params.yaml asks for 60 demo pairs and the
packaged all-MiniLM-L6-v2; a temporary DAGSTER_HOME. Every process the server starts is in its own
process group, stopped (and if need be killed) at the end.
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from helpers import offline_env

REPO = Path(__file__).resolve().parents[1]
KEYS = ["raw_preferences", "tokenized_preferences", "filtered_preferences", "reward_model", "evaluation",
        "hub_release"]
DATA_KEYS = KEYS[:3]
TINY = {"download": {"demo_pairs": 60}, "filter": {"max_token_length": 64, "max_prompt_token_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 1}}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keep it from calling Google's hosts (no network here).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Wide enough for the graph to fit at a zoom that shows full asset names (narrower: "filte…_preferences").
VIEWPORT = {"width": 2400, "height": 1000}
RUN_TIMEOUT_MS = 180_000

pytestmark = [pytest.mark.timeout(420), pytest.mark.integration]


# ---------------------------------------------------------------- the server

def documented_ui_args() -> list[str]:
    """The arguments of `dagster` in the Makefile's `ui` target: `dev -m ... -h ... -p ...`."""
    recipe = re.search(r"^ui:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    line = next(line for line in recipe.splitlines() if "dagster dev" in line)
    words = shlex.split(line)
    return words[next(i for i, w in enumerate(words) if w.endswith("/dagster")) + 1:]


def with_port(args: list[str], port: int) -> list[str]:
    out = list(args)
    out[out.index("-p") + 1] = str(port)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_project(root: Path) -> None:
    """params.yaml of the repository with the tiny settings of the orchestration tests."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_dagster_home(home: Path) -> None:
    """The shipped instance settings (orchestration/dagster.yaml), as `make ui` copies them: one run at
    a time, and no first-visit dialog over the graph."""
    home.mkdir()
    text = (REPO / "orchestration" / "dagster.yaml").read_text()
    assert yaml.safe_load(text)["nux"] == {"enabled": False}
    (home / "dagster.yaml").write_text(text)


def graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["data"]


LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus locationOrLoadError " \
            "{ __typename ... on PythonError { message } } } } } }"


def location_ready(base: str) -> bool:
    """True once the code location is loaded; fails at once if it loaded with an error."""
    entries = graphql(base, LOCATIONS)["workspaceOrError"]["locationEntries"]
    for entry in entries:
        error = entry["locationOrLoadError"] or {}
        assert error.get("__typename") != "PythonError", f"{entry['name']}: {error.get('message')}"
    return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)


def wait_until_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster dev exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if location_ready(base):
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """Ctrl-C to the whole group, as a terminal does; what is still alive after 20 s is killed.
    Descendants are collected first, so that one that left the group is not missed."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                if os.getpgid(p.pid) != proc.pid:  # the group got it already
                    p.send_signal(sig)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        _, family = psutil.wait_procs(family, timeout=grace)
        if not family:
            break
    proc.wait(timeout=10)
    assert not family, f"processes left behind: {[p.pid for p in family]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`dagster dev` with the Makefile's arguments (another port), in a temporary project folder."""
    tmp = tmp_path_factory.mktemp("ui")
    project, home, scratch = tmp / "project", tmp / "dagster_home", tmp / "scratch"
    project.mkdir()
    scratch.mkdir()
    make_project(project)
    make_dagster_home(home)
    port = free_port()
    env = {**offline_env(), "DAGSTER_HOME": str(home), "RM_ROOT": str(project),
           "TMPDIR": str(scratch)}  # dagster's workspace files and sockets stay in tmp
    env.pop("HF_TOKEN", None)
    log = tmp / "dagster_dev.log"
    dagster = Path(sys.executable).parent / "dagster"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(dagster), *with_port(documented_ui_args(), port)], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(proc, base, log)
        yield {"base": base, "port": port, "pid": proc.pid, "project": project, "home": home, "log": log,
               "tmp": tmp}
    finally:
        stop_group(proc)


# ---------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A page in headless Chromium. Requested before `server`, so that a missing browser skips
    before the server starts."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium (`make test` does where it can)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # An empty profile of its own in tmp: no first-run state, nothing shared with another run.
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@contextlib.contextmanager
def screenshot_on_failure(page, path: Path, log: Path):
    """On an error: a full-page screenshot, and the server log's tail in the message."""
    try:
        yield
    except Exception as exc:
        try:
            page.screenshot(path=str(path), full_page=True)
        except Exception as shot_error:  # the page itself may be gone
            path = f"none ({shot_error})"
        raise AssertionError(f"{exc}\nscreenshot: {path}\nurl: {page.url}\n"
                             f"dagster dev log:\n{log.read_text()[-3000:]}") from exc


def open_asset_graph(page, base: str):
    """The Lineage page: the global asset graph. Returns the graph's nodes."""
    from playwright.sync_api import expect

    page.goto(base, wait_until="domcontentloaded")
    # the label, not a substring: an icon's name can join a link's accessible name ("column_lineage Jobs")
    page.get_by_role("link", name=re.compile(r"\bLineage$")).click()
    nodes = page.locator("svg foreignObject")  # each asset node is HTML inside the graph's SVG
    expect(nodes).to_have_count(len(KEYS) + 1, timeout=60_000)  # and the observed preference_source
    expect(nodes.get_by_text("preference_source", exact=True)).to_be_visible()
    return nodes


def launch_selected(page, nodes, keys: list[str]) -> None:
    """Click the first node, shift-click the others, then "Materialize selected (n)"."""
    nodes.get_by_text(keys[0], exact=True).click()
    for key in keys[1:]:
        nodes.get_by_text(key, exact=True).click(modifiers=["Shift"])
    page.get_by_role("button", name=f"Materialize selected ({len(keys)})").click()


def follow_run(page) -> str:
    """From the "Launched run" toast to the run page; returns the run id once the run has ended."""
    from playwright.sync_api import expect

    toast = page.get_by_text(re.compile(r"^Launched run"))
    expect(toast).to_be_visible(timeout=30_000)
    page.get_by_role("button", name="View").or_(page.get_by_role("link", name="View")).first.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=30_000)
    status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$"))  # the run's status tag
    expect(status).to_be_visible(timeout=RUN_TIMEOUT_MS)
    expect(status).to_have_text("Success")
    return re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)


def test_ui_materializes_the_data_assets(browser, server):
    from playwright.sync_api import expect

    page = browser
    with screenshot_on_failure(page, server["tmp"] / "failure.png", server["log"]):
        nodes = open_asset_graph(page, server["base"])
        for key in KEYS:
            expect(nodes.get_by_text(key, exact=True)).to_be_visible()
        launch_selected(page, nodes, DATA_KEYS)
        run_id = follow_run(page)
        expect(page.get_by_text(f"{len(DATA_KEYS)} assets", exact=True)).to_be_visible()

    # What the UI showed is what the instance recorded, and the files are in the temporary project.
    instance = dg.DagsterInstance.from_config(str(server["home"]))
    try:
        run = instance.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert {k.to_user_string() for k in run.asset_selection} == set(DATA_KEYS)
        for key in KEYS:
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            if key in DATA_KEYS:
                assert event is not None and event.run_id == run_id, key
            else:
                assert event is None, f"{key} was materialized too"
    finally:
        instance.dispose()
    for folder in ("pairs", "tokenized", "filtered"):
        assert (server["project"] / "data" / folder / "manifest.json").is_file(), folder


# ---------------------------------------------------------------- where it listens

def listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def non_loopback_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6) and not a.address.startswith(("127.", "::1", "fe80"))]


def test_documented_ui_command_binds_loopback_only(server):
    """The server above runs with the Makefile's arguments; what it listens on is the proof
    (with -h 127.0.0.1 as documented, or with no -h at all: dagster's default)."""
    args = " ".join(documented_ui_args())
    assert args in (REPO / "docs" / "dagster.md").read_text()  # the docs start it the same way
    assert listening_addresses(server["port"]) == {"127.0.0.1"}
    for address in non_loopback_addresses():
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, server["port"])) != 0, f"the UI answers on {address}"
