import subprocess
import sys

import pytest

from rm_lib.cli import main
from rm_lib.errors import SettingsError
from rm_lib.settings import load_params


def test_params_yaml_is_the_source_of_defaults_and_set_overrides():
    params = load_params("params.yaml", ["train.learning_rate=1e-4", "filter.policy=truncate"])
    assert params.train.learning_rate == 1e-4 and params.filter.policy == "truncate"
    assert params.download.source == "demo" and params.filter.max_token_length == 512


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-1", "train.learning_rate: must be positive"),
    ("filter.max_token_length=0", "filter.max_token_length: must be at least 3"),
    ("tokenize.template=fancy", "tokenize.template: unknown template 'fancy'"),
    ("train.batch_size=two", "train.batch_size: must be an integer"),
    ("train.colour=blue", "train: unknown setting"),
    ("nosection.key=1", "unknown section"),
    ("filter.policy=cut", "filter.policy: must be 'drop' or 'truncate'"),
])
def test_invalid_settings_are_caught_before_work(override, message):
    with pytest.raises(SettingsError, match=message):
        load_params("params.yaml", [override])


def test_cli_reports_a_user_mistake_in_one_paragraph(tmp_path, capsys):
    code = main(["--root", str(tmp_path), "--set", "train.learning_rate=-1", "download"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: train.learning_rate") and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing was done


def test_cli_runs_a_step_as_a_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(tmp_path), "--set", "download.demo_pairs=50",
                          "download"], capture_output=True, text=True, check=True)
    assert "download: 50 rows from demo" in out.stdout
    show = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(tmp_path), "tokenize"],
                          capture_output=True, text=True, check=True)
    assert "tokenize:" in show.stdout
    view = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(tmp_path), "show-tokens", "--stage",
                           "tokenized", "--no-color"], capture_output=True, text=True, check=True)
    assert "[[CLS]]" in view.stdout and "[[SEP]]" in view.stdout
