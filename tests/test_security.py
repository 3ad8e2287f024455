"""No code from a model folder runs unless the user says so, no weights are unpickled, a
checkpoint resumes without unpickling anything, and names from the data reach neither the card's
Markdown nor the terminal as anything but text."""
import json
import pickle

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
        assert len(cells) == 4 if "subset" in row else len(cells) == 7, row  # the table's own cells, no more
        span = next(text for _, text in re.findall(r"(`+)(.*?)\1", row) if "evil" in text)
        assert "[click me](https://evil.example/x)" in span and "<img" in span  # text inside one code span
    origin = model_card._origin({"model": {"name_or_path": "org/model", "revision": None},
                                 "download": {"source": f"data/sources/{HOSTILE}.jsonl", "subset": HOSTILE}}, {})
    assert origin.count("\n") == 1 and origin.splitlines()[1].startswith("- Dataset: ``")


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
