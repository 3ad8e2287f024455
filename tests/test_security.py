"""No code from a model folder runs unless the user says so, no weights are unpickled, a
checkpoint resumes without unpickling anything, and names from the data reach neither the card's
Markdown nor the terminal as anything but text."""
import json
import pickle
from pathlib import Path

import pytest
import torch

from rm_lib.cli import main
from rm_lib.errors import SettingsError
from rm_lib.model.modeling import load_model_config, load_reward_model, load_tokenizer

from helpers import fit_tiny


class WritesMarker:
    """A pickle that, when loaded, creates a file: what a malicious pytorch_model.bin would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def custom_code_model(tmp_path, minilm_path):
    """A model folder whose config asks to run its own Python file, which would leave a marker."""
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(minilm_path, folder)
    marker = tmp_path / "custom-code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import BertConfig\n"
                                    "class EvilConfig(BertConfig):\n    model_type = 'evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForSequenceClassification": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_remote_code_is_off_by_default_and_never_runs(custom_code_model, tmp_path, capsys):
    folder, marker = custom_code_model
    with pytest.raises(SettingsError, match="trust_remote_code=true"):
        load_model_config(str(folder))
    with pytest.raises(SettingsError, match="trust_remote_code=true"):
        load_reward_model(str(folder))
    assert main(["--root", str(tmp_path / "project"), "--set", f"model.name_or_path={folder}", "run"]) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "project" / "data").exists()


def test_pickled_weights_are_never_loaded(tmp_path, minilm_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(minilm_path, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"bert.embeddings.word_embeddings.weight": WritesMarker(marker)}, handle)
    with pytest.raises(SettingsError, match="from safetensors"):
        load_reward_model(str(folder))
    assert not marker.exists()
    load_tokenizer(str(folder))  # the tokenizer files are JSON, loaded as usual


def test_a_checkpoint_resumes_without_unpickling(tmp_path, tiny_decoder, monkeypatch):
    fit_tiny(tmp_path, tiny_decoder, "train.max_steps=2")
    checkpoint = tmp_path / "checkpoints" / "step-2"
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the LR schedule is in trainer_state.json
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 2

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    result, _, _ = fit_tiny(tmp_path, tiny_decoder, "train.max_steps=2")  # same run: resumes at its end
    assert result.resumed_from == 2
    assert loads and all(w is True for w in loads), loads  # torch.load only in weights-only mode


HOSTILE = ("a` | 1.0 |\n\n[click me](https://evil.example/x) ![t](https://evil.example/p.png)\n"
           "<img src=x onerror=alert(1)>\n---")


def test_names_from_the_data_stay_text_inside_their_place_in_the_model_card():
    """A subset, suite or source name was put into the published card as written: it ended the evaluation
    table and added a live link, a remote image (a tracking pixel on the Hub page) and raw HTML."""
    import re

    from rm_lib.publish import model_card

    metrics = {"pairs": 3, "accuracy": 0.5, "per_subset": {HOSTILE: {"pairs": 3, "accuracy": 0.5}},
               "suites": {"mine": {"source": HOSTILE, "layout": "pairwise", "rows": 3, "accuracy": 0.5}}}
    for table in (model_card._evaluation(metrics, []), model_card._suites(metrics)):
        row = next(line for line in table.splitlines() if "evil.example" in line)
        cells = re.split(r"(?<!\\)\|", row)
        assert len(cells) == 4 if "subset" in row else len(cells) == 8, row  # the table's own cells, no more
        span = next(text for _, text in re.findall(r"(`+)(.*?)\1", row) if "evil" in text)
        assert "[click me](https://evil.example/x)" in span and "<img" in span  # text inside one code span
    origin = model_card._origin({"model": {"name_or_path": "org/model", "revision": None},
                                 "download": {"source": f"data/sources/{HOSTILE}.jsonl", "subset": HOSTILE}}, {})
    assert origin.count("\n") == 2 and origin.splitlines()[1].startswith("- Dataset: ``")  # base, data, license


def test_control_characters_from_the_data_are_printed_escaped(tmp_path, capsys):
    """A column named with terminal escapes retitled the terminal and printed a fake green line through
    download's summary ("ignored columns ...")."""
    source = tmp_path / "prefs.jsonl"
    column = "\x1b]0;PWNED\x07\x1b[2K\x1b[32mALL CHECKS PASSED\x1b[0m"
    source.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no", column: 1}) + "\n"
                              for i in range(20)))
    assert main(["--root", str(tmp_path / "p"), "download", "--set", f"download.source={source}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;PWNED\\x07" in out


def test_gate_details_that_name_data_stay_text_on_the_published_card(tmp_path):
    """The release gate's details name subsets from the data and sources from a Hub release's record; the
    card's gate table put them in as written: a live link, a remote image (a tracking pixel) and bold text."""
    from markdown_it import MarkdownIt

    from rm_lib.evaluation import quality
    from rm_lib.layout import Layout
    from rm_lib.publish import model_card

    layout = Layout(tmp_path)
    layout.evaluation.mkdir(parents=True)
    hostile = ("x [click here](https://evil.example/phish) <img src=https://evil.example/p.png> **URGENT** a|b "
               "https://evil.example/login www.evil.example")
    (layout.evaluation / "report.json").write_text(json.dumps(
        {"per_subset": {hostile: {"pairs": 3, "accuracy": 0.0}, "plain": {"pairs": 3, "accuracy": 1.0}}}))
    verdict = quality.subset_gate(layout, 0.9)
    assert not verdict.passed and hostile in verdict.description  # the CLI and Dagster say the name as it is
    source = {"check": "accuracy_gate", "passed": False,
              "description": "measured on another source (<img src=https://evil.example/p.png> [login](https://evil.example))"}
    card = model_card._gate([{"check": verdict.name, "passed": False, "description": verdict.description}, source],
                            False)
    html = MarkdownIt("commonmark").enable("table").render(card)
    assert "<a " not in html and "<img" not in html and "<strong>URGENT" not in html, html
    assert "[click <code>here](https://evil.example/phish)</code>" in html  # all of it shown, as text
    assert "<code>src=https://evil.example/p.png&gt;</code>" in html
    # GitHub's Markdown and the Hub's link a bare URL or www. by themselves: not inside a code span
    assert "<code>https://evil.example/login</code>" in html and "<code>www.evil.example</code>" in html
    assert html.count("<tr>") == 3 and all(row.count("<td>") == 3 for row in html.split("<tr>")[2:])  # no cell added


def test_the_hub_libraries_log_urls_without_their_credentials(caplog):
    """huggingface_hub logs each retry with the URL it requested ("HTTP Error 500 thrown while requesting
    HEAD http://user:password@proxy/..."): the password of an HF_ENDPOINT went to the terminal and the run log."""
    import logging

    from rm_lib import network

    network.bound_hub_client()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("huggingface_hub.utils._http").warning(
            "HTTP Error 500 thrown while requesting HEAD http://alice:S3CRET@127.0.0.1:9/api/models/o/m")
        logging.getLogger("huggingface_hub.file_download").warning(
            "Error while downloading from %s: %s", "https://alice:S3CRET@hub.example/o/m/model.safetensors", "reset")
        logging.getLogger("myproject").warning("https://user:kept@mine.example")  # not a library's: as it was
    assert logging.makeLogRecord({}).name is None  # a record with no logger's name (Dagster's handler makes one)
    said = [record.getMessage() for record in caplog.records]
    assert said[:2] == ["HTTP Error 500 thrown while requesting HEAD http://127.0.0.1:9/api/models/o/m",
                        "Error while downloading from https://hub.example/o/m/model.safetensors: reset"]
    assert said[2] == "https://user:kept@mine.example"


def test_a_dvc_remotes_credentials_stay_out_of_what_dagster_shows(tmp_path):
    """A remote's URL with a token, kept in the git-ignored .dvc/config.local as DVC advises, went into
    every materialization's `dvc_remote` metadata."""
    from rm_lib.pipeline import dvc_record

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: python -m rm_lib train\n")
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = storage\n['remote \"storage\"']\n"
                                              "    url = https://example.com/org/repo.dvc\n")
    (tmp_path / ".dvc" / "config.local").write_text("['remote \"storage\"']\n"
                                                    "    url = https://alice:ghp_S3CRET@example.com/org/repo.dvc\n")
    spec = dvc_record.read_stage(tmp_path, "train")
    assert spec.remote == "storage" and spec.remote_url == "https://example.com/org/repo.dvc"


def test_a_model_load_error_names_the_hub_without_its_credentials(tmp_path):
    """A Hub that cannot be reached through an HF_ENDPOINT with a password: tokenize's one error line said
    the password ("We couldn't connect to 'http://alice:...@proxy'")."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a port nothing listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://alice:S3CRET@127.0.0.1:{port}"}
    # huggingface_hub's own five retries (23 s) off: the error is the same after them
    code = ("import sys; from rm_lib import network; from rm_lib.cli import main\n"
            "with network.hub_retries_off(): sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "--root", str(tmp_path), "--set",
                           "model.name_or_path=owner/model", "tokenize"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"couldn't connect to 'http://127.0.0.1:{port}'" in done.stderr
    assert "S3CRET" not in done.stderr + done.stdout


def test_json_nested_deeper_than_python_reads_is_one_line_naming_the_file(tmp_path, tiny_decoder):
    """A config.json, tokenizer_config.json, rm_lib.json or trained_prompts.json of `[` 100,000 deep (a model
    folder or Hub release made to break readers), or such an evaluation.json at the Hub: RecursionError
    tracebacks. The line names the model's folder (transformers reads several files there) or the file."""
    import shutil

    from rm_lib.data import trained_prompts
    from rm_lib.errors import DataError
    from rm_lib.evaluation.scoring import training_record
    from rm_lib.publish import hub

    deep = "[" * 100_000 + "]" * 100_000
    for number, name in enumerate(("config.json", "tokenizer_config.json")):
        folder = Path(shutil.copytree(tiny_decoder, tmp_path / f"model-{number}"))
        (folder / name).write_text(deep)
        loader = load_model_config if name == "config.json" else load_tokenizer
        with pytest.raises(SettingsError, match=f"cannot load .*'{folder}'.*recursion depth"):
            loader(str(folder))
    with pytest.raises(DataError, match="trained_prompts.json: not valid JSON"):  # a base model's, or a release's
        trained_prompts.parse(deep.encode(), "base/trained_prompts.json")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "rm_lib.json").write_text(deep)
    with pytest.raises(DataError, match="rm_lib.json.*not valid JSON"):
        training_record(str(tmp_path / "model"))
    assert hub._is_release(('{"accuracy": 0.5, "x": ' + deep + "}").encode()) is False


def test_a_config_claiming_more_layers_than_its_weights_hold_is_refused_before_any_work(tmp_path, tiny_decoder):
    """num_hidden_layers 100,000 over a 2-layer model's weights: train sat in transformers' initialisation of
    the missing layers (past 9 GB) after the data steps; fewer claimed would have trained random layers."""
    import shutil

    folder = Path(shutil.copytree(tiny_decoder, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    held = config["num_hidden_layers"]
    assert load_model_config(str(folder)).num_hidden_layers == held  # as saved: no refusal
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100_000}))
    with pytest.raises(SettingsError, match=f"config.json says 100000 layers \\(num_hidden_layers\\), its weights "
                                            f"hold {held}; the others would be built with random weights"):
        load_model_config(str(folder))
    # names whose first index is no layer's: T5's `block.N.layer.M` (M a sub-layer), Funnel's `blocks.G.L`
    from transformers import FunnelConfig, FunnelForSequenceClassification, T5Config, T5ForSequenceClassification

    for name, model in (
            ("t5", T5ForSequenceClassification(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=4,
                                                         num_heads=2, num_labels=1))),
            ("funnel", FunnelForSequenceClassification(FunnelConfig(vocab_size=64, block_sizes=[2, 2, 2], d_model=16,
                                                                    n_head=2, d_head=8, d_inner=32, num_labels=1)))):
        model.save_pretrained(tmp_path / name)
        assert load_model_config(str(tmp_path / name)).num_hidden_layers > 3  # not refused
