"""No code from a model folder runs unless the user says so, no weights are unpickled, and a
checkpoint resumes without unpickling anything."""
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
