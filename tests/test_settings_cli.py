import os
import shlex
import subprocess
import sys

import pytest

from rm_lib.cli import main
from rm_lib.errors import SettingsError
from rm_lib.settings import load_params

from helpers import alias_bomb


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
    ("push.repo_id=not a repo!!", "push.repo_id: 'not a repo!!' is not a valid repository name"),
    ("push.repo_id=alice/bad name", "push.repo_id: 'alice/bad name' is not a valid repository name"),
    ("push.repo_id=me/a--b", "no '--' or '..'"),
    # the refusal of the union's last type said "must be a string, got 1.5"
    ("train.max_tokens_per_forward=1.5", r"train.max_tokens_per_forward: must be auto, at least 1 or null, got 1.5$"),
    ("train.gradient_checkpointing=5", r"train.gradient_checkpointing: must be auto, true or false, got 5$"),
    # each was a silent wait: the demo's rows built in memory, the schedule counted epoch by epoch
    ("download.demo_pairs=100000000000", "download.demo_pairs: must be from 10 to 1,000,000"),
    ("train.num_epochs=1e300", "train.num_epochs: must be at most 10,000, got 1e.300; for a fixed number of steps"),
    # the test pairs would be training pairs: the error said "no usable pairs for train ... 0 rejected"
    ("download.test_split=train", "download.test_split: names the train split too .'train'.: the test pairs would be"),
    ("evaluate.num_print_samples=-1", "evaluate.num_print_samples: must be 0 or more, got -1"),
    ("train.num_print_samples=-1", "train.num_print_samples: must be 0 or more, got -1"),
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
    piped = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(tmp_path), "show-tokens", "--stage",
                            "tokenized"], capture_output=True, text=True, check=True)
    assert "\x1b[" not in piped.stdout and piped.stdout == view.stdout  # no colour codes into a pipe or a file


def test_the_next_commands_after_run_name_this_environments_python_and_dvc(tmp_path, monkeypatch):
    """`make run` ended by suggesting `python -m rm_lib run ...` and `dvc exp run`: in a fresh shell the
    system python has none of the project's packages (a traceback), and no dvc is on the PATH."""
    import rm_lib.cli as cli
    from rm_lib.layout import Layout

    prefix = tmp_path / ".venv"
    (prefix / "bin").mkdir(parents=True)
    for program in ("python", "dvc"):
        (prefix / "bin" / program).write_text("")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.chdir(tmp_path)
    told = cli.where_to_look(Layout(tmp_path), demo=True)
    assert ".venv/bin/python -m rm_lib run --set download.source=" in told
    assert ".venv/bin/dvc exp run -S train.learning_rate=1e-4 && .venv/bin/dvc exp show" in told
    # run from another folder (`run --root`): the commands name the project, quoted (a space, not ASCII)
    project = tmp_path / "my prôject"
    monkeypatch.chdir(tmp_path / ".venv")
    told = cli.where_to_look(Layout(project), demo=True)
    real_data = next(line for line in told.splitlines() if "real data" in line).split("  (or")[0].split()[2:]
    argv = shlex.split(" ".join(real_data))
    assert argv[:5] == [str(prefix / "bin/python"), "-m", "rm_lib", "run", "--root"] and argv[5] == str(project)
    compare = next(line for line in told.splitlines() if "compare" in line).split("compare", 1)[1].strip()
    assert shlex.split(compare)[:4] == ["cd", str(project), "&&", str(prefix / "bin/dvc")]


def test_a_step_run_from_a_folder_inside_a_project_is_refused_saying_where_the_project_is(tmp_path, monkeypatch,
                                                                                         capsys):
    """From data/ (or tests/), `download` read no params.yaml, ran on the built-in settings (2,000 demo pairs
    where the project's said 40) and wrote data/data/pairs, with its lock in data/.rm_lib: a `run` would have
    trained and released a model of the defaults there. Refused before anything is written; --root says
    where to run, and `--root .` runs there on the built-in settings."""
    import json

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "params.yaml").write_text("download:\n  demo_pairs: 40\n")
    (project / "dvc.yaml").write_text("stages:\n  download:\n    cmd: python -m rm_lib download\n")
    monkeypatch.chdir(project / "data")
    assert main(["download"]) == 2
    assert capsys.readouterr().err == (
        f"error: the current folder holds no params.yaml and lies inside the project {project}: run from there "
        f"(cd {project}) or pass --root {project}; --root . runs here, on the built-in settings\n")
    assert sorted(os.listdir(project / "data")) == []
    # score and show-tokens read, and write where they are told: they run there as before
    capsys.readouterr()
    assert main(["show-tokens"]) == 2 and "not found; run the filter step first" in capsys.readouterr().err
    assert main(["download", "--root", ".."]) == 0
    assert json.loads((project / "data/pairs/manifest.json").read_text())["rows_read"] == 40
    # a folder above that is no project of this kind (another tool's params.yaml) is not one
    (tmp_path / "other/scratch").mkdir(parents=True)
    (tmp_path / "other/params.yaml").write_text("epochs: 3\n")
    monkeypatch.chdir(tmp_path / "other/scratch")
    assert main(["download", "--set", "download.demo_pairs=30"]) == 0
    assert json.loads((tmp_path / "other/scratch/data/pairs/manifest.json").read_text())["rows_read"] == 30


def _captured_params(monkeypatch, argv):
    """Run the CLI with every step replaced by a recorder; returns (exit code, params, layout root)."""
    import rm_lib.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_run_step", lambda step, params, layout: seen.update(params=params, root=layout.root))
    code = cli.main(argv)
    return code, seen.get("params"), seen.get("root")


def test_options_are_read_before_and_after_the_step(tmp_path, monkeypatch):
    params_file = tmp_path / "tiny.yaml"
    params_file.write_text("download:\n  demo_pairs: 40\n")
    code, params, root = _captured_params(monkeypatch, [
        "--set", "download.seed=7", "download", "--set", "download.source=../shared/data/x.jsonl",
        "--params", str(params_file), "--root", str(tmp_path), "--set", "download.test_fraction=0.5"])
    assert code == 0 and root == tmp_path
    download = params.download
    assert (download.seed, download.source, download.test_fraction) == (7, "../shared/data/x.jsonl", 0.5)
    assert params.download.demo_pairs == 40  # --params given after the step is read
    # a --set after the step wins over the same key set before it
    code, params, _ = _captured_params(monkeypatch, ["--set", "download.seed=1", "download", "--set", "download.seed=2",
                                                     "--root", str(tmp_path)])
    assert code == 0 and params.download.seed == 2


def test_score_and_show_tokens_take_the_common_options_after_the_step(tmp_path, capsys):
    code = main(["score", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--root", str(tmp_path), "--set", "train.learning_rate=-1"])
    assert code == 2 and capsys.readouterr().err.startswith("error: train.learning_rate")


def _float_fields():
    import dataclasses
    import typing

    from rm_lib.settings import Params

    hints = typing.get_type_hints(Params)
    for section in dataclasses.fields(Params):
        for name, hint in typing.get_type_hints(hints[section.name]).items():
            if hint is float or hint == (float | None):
                yield section.name, name


FLOAT_FIELDS = list(_float_fields())


def test_every_float_setting_is_found():
    assert ("train", "learning_rate") in FLOAT_FIELDS and ("download", "test_fraction") in FLOAT_FIELDS
    assert ("train", "center_rewards_coefficient") in FLOAT_FIELDS


@pytest.mark.parametrize("section, key", FLOAT_FIELDS)
def test_a_float_written_like_1e_minus_1_is_accepted_in_params_yaml_as_by_set(tmp_path, section, key):
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {key}: 1e-1\n")  # YAML 1.1 reads this as the string '1e-1'
    assert getattr(getattr(load_params(path), section), key) == 0.1
    assert getattr(getattr(load_params(None, [f"{section}.{key}=1e-1"]), section), key) == 0.1


@pytest.mark.parametrize("section, key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e999"])
def test_nan_and_infinite_float_settings_are_refused(tmp_path, section, key, value):
    with pytest.raises(SettingsError, match=f"{section}.{key}: must be a finite number"):
        load_params(None, [f"{section}.{key}={value}"])
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(SettingsError, match=f"{section}.{key}: must be a finite number"):
        load_params(path)


@pytest.mark.parametrize("text, message", [
    ("train: 5\n", r"train: expected a mapping of settings, got int"),
    ("train:\n  - 1\n  - 2\n", r"train: expected a mapping of settings, got list"),
    ("filter: drop\n", r"filter: expected a mapping of settings, got str"),
])
def test_a_section_that_is_not_a_mapping_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=f"{path}: {message}"):
        load_params(path)
    assert main(["--params", str(path), "--root", str(tmp_path), "download"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "data").exists()


def test_a_non_utf8_params_file_or_a_folder_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("download:\n  source: caf\xe9.jsonl\n".encode("latin-1"))
    with pytest.raises(SettingsError, match=f"{path}: not UTF-8 text"):
        load_params(path)
    with pytest.raises(SettingsError, match=f"{tmp_path}: is a folder, not a params file"):
        load_params(tmp_path)
    assert main(["--params", str(tmp_path), "--root", str(tmp_path), "download"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_score_input_that_does_not_exist_names_the_path(tmp_path, capsys):
    missing = tmp_path / "pairs.jsonl"
    code = main(["--root", str(tmp_path), "score", "--input", str(missing), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {missing}: no such file or folder\n"


def test_show_tokens_index_out_of_range_and_before_filter_are_one_line(tmp_path, capsys):
    from helpers import run_steps, tiny_params

    assert main(["--root", str(tmp_path), "show-tokens"]) == 2
    err = capsys.readouterr().err
    assert "filtered/train.parquet" in err and "run the filter step first" in err and err.count("\n") == 1
    run_steps(tiny_params(), tmp_path, "download", "tokenize", "filter")
    assert main(["--root", str(tmp_path), "show-tokens", "--index", "999", "--no-color"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: show-tokens --index 999: the filtered train split has ") and err.count("\n") == 1
    assert main(["--root", str(tmp_path), "show-tokens", "--index", "3", "--no-color"]) == 0



def test_show_tokens_decodes_with_the_tokenizer_that_made_the_ids(tmp_path, capsys, tiny_decoder):
    """Token ids mean words of the tokenizer that made them: decoded with the model params.yaml names
    now (MiniLM's vocabulary), a decoder's ids read as [unused] tokens, in the tool for seeing what the
    model sees."""
    from helpers import run_steps, tiny_params

    run_steps(tiny_params(model=str(tiny_decoder)), tmp_path, "download", "tokenize", "filter")
    show = ["--root", str(tmp_path), "show-tokens", "--index", "3", "--no-color"]
    assert main([*show, "--set", f"model.name_or_path={tiny_decoder}"]) == 0
    expected = capsys.readouterr()
    assert expected.err == "" and "[unused" not in expected.out
    assert main(show) == 0  # params.yaml's model: the default, MiniLM
    seen = capsys.readouterr()
    assert seen.out == expected.out
    assert seen.err == (f"show-tokens: decoded with the tokenizer of '{tiny_decoder}', which made these token ids "
                        f"({tmp_path / 'data/tokenized/manifest.json'}); model.name_or_path is 'default'\n")

@pytest.mark.parametrize("row, field", [({"margin": float("nan")}, "margin"), ({"margin": float("inf")}, "margin"),
                                        ({"score_chosen": float("-inf"), "score_rejected": 1.0}, "score_chosen"),
                                        # JSON integers have no limit; past float's range they would be inf
                                        ({"margin": 10**400}, "margin"),
                                        ({"score_chosen": 1, "score_rejected": -10**400}, "score_rejected"),
                                        ({"score_chosen": 1e308, "score_rejected": -1e308}, "score_chosen")])
def test_nan_or_infinite_margins_in_the_data_are_refused(tmp_path, capsys, row, field):
    from helpers import write_jsonl

    good = {"prompt": "The film was", "chosen": "wonderful.", "rejected": "awful."}
    src = write_jsonl(tmp_path / "pairs.jsonl", [dict(good, margin=1.0), dict(good, **row)])  # json writes NaN/Infinity
    assert main(["--root", str(tmp_path), "download", "--set", f"download.source={src}"]) == 2
    err = capsys.readouterr().err
    assert f"file {src}, row 2, field '{field}'" in err and "finite" in err and err.count("\n") == 1


def test_run_refuses_a_model_with_only_pickled_weights_before_any_step(tmp_path, minilm_path, capsys):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(minilm_path, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    project = tmp_path / "project"
    assert main(["--root", str(project), "run", "--set", f"model.name_or_path={folder}"]) == 2
    err = capsys.readouterr().err
    assert "has no safetensors weights" in err and "pytorch_model.bin" in err and err.count("\n") == 1
    assert not (project / "data").exists()


def test_params_yaml_means_the_same_after_dvc_rewrites_its_nulls(tmp_path):
    """`dvc exp run -S` writes params.yaml back with ruamel, which leaves `key:` where `key: null`
    stood: YAML reads both as null, so the settings are the same."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "params.yaml").read_text(encoding="utf-8")
    rewritten = re.sub(r"^(\s*[\w_]+):\s*null\b", r"\1:", text, flags=re.M)
    assert rewritten != text
    (tmp_path / "params.yaml").write_text(rewritten, encoding="utf-8")
    assert load_params(tmp_path / "params.yaml") == load_params(root / "params.yaml")


def test_mixed_precision_no_is_read_as_no_though_yaml_reads_it_as_false(tmp_path):
    assert load_params(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    (tmp_path / "params.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_params(tmp_path / "params.yaml").train.mixed_precision == "no"
    with pytest.raises(SettingsError, match="train.mixed_precision: must be a string, got True"):
        load_params(None, ["train.mixed_precision=yes"])  # true has no meaning of its own there


def test_a_wandb_mode_the_settings_do_not_take_is_named_with_the_ones_they_do():
    with pytest.raises(SettingsError, match="wandb_mode: must be auto, online, offline or disabled, got 'sometimes'"):
        load_params(None, ["train.wandb_mode=sometimes"])
    assert load_params(None, ["train.wandb_mode=offline"]).train.wandb_mode == "offline"


@pytest.mark.parametrize("overrides, message", [
    (["model.revision=abc"], r"model.revision: 'abc' is set, but 'default' is a local model that has no revisions"),
    (["model.name_or_path=tests", "model.revision=v1"], r"model.revision: 'v1' is set, but 'tests' is a local model"),
    (["model.name_or_path=/no/such/model"], r"model.name_or_path: '/no/such/model': no such folder"),
])
def test_a_model_setting_that_the_records_would_misstate_is_refused(overrides, message):
    """A local folder has no commits: transformers ignores a revision there, and run.json and the model
    card would name one that was never loaded."""
    with pytest.raises(SettingsError, match=message):
        load_params("params.yaml", overrides)
    assert load_params("params.yaml", ["model.name_or_path=org/model", "model.revision=v1"]).model.revision == "v1"


def test_a_home_folder_path_in_params_yaml_is_expanded(tmp_path, monkeypatch):
    """A shell expands ~ on the command line; params.yaml and a quoted --set do not: the settings do."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    params = load_params("params.yaml", ["download.source=~/pairs.jsonl", "model.name_or_path=~/model"])
    assert (params.download.source, params.model.name_or_path) == (str(tmp_path / "pairs.jsonl"),
                                                                   str(tmp_path / "model"))


def test_ctrl_c_ends_a_step_with_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from rm_lib import cli

    def interrupted(step, params, layout):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_step", interrupted)
    assert main(["--root", str(tmp_path), "download"]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted: download stopped and left its earlier output as it was\n"
    assert main(["--root", str(tmp_path), "train"]) == 130  # only train has checkpoints to resume from
    assert capsys.readouterr().err == ("interrupted: train stopped and left its earlier output as it was; train "
                                       "resumes from its last checkpoint when run again\n")

    def interrupted_at_filter(step, params, layout):
        if step == "filter":
            raise KeyboardInterrupt

    # `run` names the step it stopped in and the ones that had finished (it said the run left every output)
    monkeypatch.setattr(cli, "_run_step", interrupted_at_filter)
    assert main(["--root", str(tmp_path), "run"]) == 130
    assert capsys.readouterr().err == ("interrupted: filter stopped and left its earlier output as it was "
                                       "(download, tokenize had finished and replaced theirs)\n")


def test_tokenize_workers_leave_a_stop_to_the_step(tiny_decoder):
    """SIGTERM to the process group (systemd, Slurm, `kill -- -pgid`) reached tokenize's idle workers too, which
    inherited the CLI's handler and each printed a traceback before the step's one line."""
    import subprocess
    import sys

    from helpers import offline_env

    code = ("import signal; from rm_lib import cli; from rm_lib.data import tokenization as t; "
            "signal.signal(signal.SIGTERM, lambda *a: None); "
            f"t._init_worker({str(tiny_decoder)!r}, 'simple_chat'); "
            "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "
            "signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    said = subprocess.run([sys.executable, "-c", code], env=offline_env(), capture_output=True, text=True, timeout=120)
    assert said.stdout == "True True\n", said.stderr[-2000:]


def test_sigterm_ends_a_score_with_one_line_and_leaves_its_last_output(tmp_path):
    """`kill` (a scheduler, systemd) ended a long `score` with exit 143 and not a word; Ctrl-C's line named
    train's checkpoints to a score, which has none."""
    import signal
    import subprocess
    import sys

    from helpers import offline_env

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    output = tmp_path / "scores.jsonl"
    output.write_text('{"old": 1}\n', encoding="utf-8")
    # a scoring that never ends stands for a long one: the signal arrives inside the step
    code = ("import sys, time; from rm_lib import cli; from rm_lib.steps import score; "
            "score.run_file = lambda *a, **k: [print('started', flush=True), time.sleep(600)]; "
            f"sys.exit(cli.main(['--root', {str(tmp_path)!r}, 'score', '--input', {str(pairs)!r}, "
            f"'--output', {str(output)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=offline_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (143, "interrupted by SIGTERM: score stopped and left its earlier output as it "
                                           "was\n")
    assert output.read_text(encoding="utf-8") == '{"old": 1}\n'


def test_a_model_folder_without_a_config_says_so(tmp_path):
    from rm_lib.model.modeling import load_model_config

    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match=r"the folder '.*empty' has no config.json"):
        load_model_config(str(tmp_path / "empty"))


@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "train.seed: must lie in [0, 2**32 - 1], got -1"),
    ("train.seed=4294967296", "train.seed: must lie in [0, 2**32 - 1]"),
    ("train.eval_steps=0", "train.eval_steps: must be at least 1 or null"),
    ("train.eval_steps=-1", "train.eval_steps: must be at least 1 or null"),
    ("train.lora_alpha=-4", "train.lora_alpha: must be positive, got -4"),
    ("train.lora_dropout=2", "train.lora_dropout: must lie in [0, 1), got 2.0"),
    ("train.lora_dropout=-0.1", "train.lora_dropout: must lie in [0, 1)"),
    ("train.lora_target_modules=[]", "train.lora_target_modules: must be null"),
    ("train.center_rewards_coefficient=-1", "train.center_rewards_coefficient: must not be negative, got -1"),
])
def test_training_settings_that_libraries_would_refuse_mid_run_are_one_line_before_work(tmp_path, capsys, override,
                                                                                       message):
    assert main(["--root", str(tmp_path), "train", "--set", "train.lora=true", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and not (tmp_path / "data").exists()


def test_run_refuses_a_missing_suite_file_before_any_work(tmp_path, capsys):
    """An evaluation suite naming a file that is not there was found at evaluate, after download, tokenize,
    filter and train had replaced their outputs."""
    suite = f'evaluate.suites=["{tmp_path / "missing-suite.jsonl"}"]'
    assert main(["--root", str(tmp_path / "p"), "run", "--set", suite]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: evaluate.suites: ") and "missing-suite.jsonl" in err and err.count("\n") == 1
    assert not (tmp_path / "p" / "data").exists()


def test_lora_target_modules_the_model_lacks_are_one_line_naming_the_modules_it_has(tmp_path, capsys, tiny_decoder):
    assert main(["--root", str(tmp_path), "run", "--set", "train.lora=true",
                 "--set", 'train.lora_target_modules=["nope"]']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.lora_target_modules: ['nope'] match no module") and err.count("\n") == 1
    assert "query" in err and "value" in err and not (tmp_path / "data").exists()  # MiniLM's own names
    from rm_lib.model.modeling import check_lora_targets, load_model_config

    config = load_model_config(str(tiny_decoder))
    with pytest.raises(SettingsError, match=r"\['nope'\] match no module .* named .*q_proj"):
        check_lora_targets(config, ["nope"])
    check_lora_targets(config, ["q_proj", "nope"])  # peft adapts what matches
    # peft's all-linear, as TRL's recipes write it, on a decoder and on MiniLM (it was "must be a list of strings")
    assert load_params("params.yaml", ["train.lora_target_modules=all-linear"]).train.lora_target_modules == \
        "all-linear"
    check_lora_targets(config, "all-linear")
    check_lora_targets(load_model_config("default"), "all-linear")


@pytest.mark.parametrize("family, small, targets", [
    ("phi3", {"num_key_value_heads": 2}, ["qkv_proj"]),
    ("distilbert", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}, ["q_lin", "v_lin"]),
    ("modernbert", {}, ["Wqkv"]),
    ("llama", {}, ["q_proj", "v_proj"]),  # peft's own default
])
def test_lora_adapts_the_attention_of_families_peft_has_no_default_for(family, small, targets):
    """train.lora=true stopped at the train step, after the data steps, for Phi-3, DistilBERT and
    ModernBERT: peft names no default targets for them. Their query and value projections are taken."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm_lib.model.modeling import add_lora, check_lora_targets

    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    config = AutoConfig.for_model(family, num_labels=1, pad_token_id=0, vocab_size=100,
                                  **(small if family == "distilbert" else {**sizes, **small}))
    check_lora_targets(config, None)
    model = add_lora(AutoModelForSequenceClassification.from_config(config), r=2, alpha=4, dropout=0.0,
                     target_modules=None)
    assert sorted(model.peft_config["default"].target_modules) == targets
    adapted = {name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters()
               if "lora_A" in name}
    assert adapted == set(targets)


def test_weights_that_become_nan_after_the_last_update_are_a_divergence_not_a_crash(tmp_path):
    from rm_lib.errors import TrainingDiverged

    from helpers import run_steps, tiny_params

    run_steps(tiny_params(), tmp_path, "download", "tokenize", "filter")
    # the one step's loss is finite; the update it makes at this rate leaves NaN weights
    with pytest.raises(TrainingDiverged, match=r"train: the weights became non-finite at step 1 .* lower "
                                               r"train.learning_rate"):
        run_steps(tiny_params("train.learning_rate=1e7", "train.lr_scheduler=constant", "train.max_steps=1"),
                  tmp_path, "train")
    assert not (tmp_path / "models/reward_model").exists()


def test_a_max_token_length_past_the_models_positions_is_refused_before_any_work(tmp_path, capsys, tiny_decoder):
    """Pairs longer than the position table crash training (index 512 is out of bounds) or, cut by the
    scorer alone, get other rewards from `score` than training and evaluation read."""
    assert main(["--root", str(tmp_path), "run", "--set", "filter.max_token_length=2048",
                 "--set", "filter.max_prompt_token_length=100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: filter.max_token_length: 2048 is more than the 512 tokens the model 'default' reads")
    assert err.count("\n") == 1 and not (tmp_path / "data").exists()
    decoder = ["--set", f"model.name_or_path={tiny_decoder}", "--set", "filter.max_token_length=512",
               "--set", "filter.policy=truncate"]
    assert main(["--root", str(tmp_path), "run", *decoder]) == 2
    err = capsys.readouterr().err
    assert f"filter.max_token_length: 512 is more than the 256 tokens the model '{tiny_decoder}' reads" in err
    assert err.count("\n") == 1 and not (tmp_path / "data").exists()


def test_the_filter_and_train_steps_refuse_pairs_longer_than_the_model_reads(tmp_path, tiny_decoder):
    """Dagster and `dvc repro` call the steps without the command line's checks."""
    import shutil

    from rm_lib.data.tokenstore import read_rows
    from rm_lib.files import read_json, write_json

    from helpers import run_steps, tiny_params

    model = str(tiny_decoder)
    with pytest.raises(SettingsError, match="filter.max_token_length: 512 is more than the 256 tokens"):
        run_steps(tiny_params("filter.max_token_length=512", model=model), tmp_path, "download", "tokenize", "filter")
    assert not (tmp_path / "data/filtered").exists()
    shorter = tmp_path / "short-model"  # the model the pairs were tokenized for, then made to read fewer tokens
    shutil.copytree(tiny_decoder, shorter)
    run_steps(tiny_params(model=str(shorter)), tmp_path, "tokenize", "filter")
    write_json(shorter / "config.json", dict(read_json(shorter / "config.json"), max_position_embeddings=32))
    longest = max(len(r[f"input_ids_{s}"]) for split in ("train", "test")
                  for r in read_rows(tmp_path / f"data/filtered/{split}.parquet") for s in ("chosen", "rejected"))
    assert longest > 32
    with pytest.raises(SettingsError, match=rf"filter.max_token_length: {longest} \(the longest filtered sequence\) "
                                            "is more than the 32"):
        run_steps(tiny_params(model=str(shorter)), tmp_path, "train")


def test_the_length_check_passes_the_defaults_and_models_of_unknown_length(monkeypatch):
    from types import SimpleNamespace

    from rm_lib.model import modeling

    params = load_params("params.yaml")
    modeling.check_max_token_length(params.filter.max_token_length, params.model.name_or_path)  # 512 of 512
    monkeypatch.setattr(modeling, "load_model_config", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(modeling, "load_tokenizer", lambda *a, **k: SimpleNamespace(model_max_length=int(1e30)))
    modeling.check_max_token_length(100_000, "a-model-without-positions")


def test_a_roberta_style_position_table_counts_its_offset_where_the_tokenizer_gives_no_limit():
    """RoBERTa numbers positions from pad_token_id + 1: a table of 66 reads 64 tokens. With a tokenizer
    that names no limit, 66 passed the filter and train crashed ("index 66 is out of bounds")."""
    from types import SimpleNamespace

    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from rm_lib.model.modeling import max_sequence_length

    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=66, pad_token_id=1, num_labels=1)
    unlimited = SimpleNamespace(model_max_length=int(1e30))
    limit = max_sequence_length(config, unlimited)
    assert limit == 64
    model = RobertaForSequenceClassification(config).eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 5))  # the most it reads
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 5))
    config.model_type = "llama"  # other position tables start at 0
    assert max_sequence_length(config, unlimited) == 66


@pytest.mark.parametrize("argv, message", [
    (["score", "--input", "{good}", "--output", "{good}/rewards.jsonl"],
     "--output {good}/rewards.jsonl: cannot be written: {good} is a file, not a folder"),
    (["score", "--input", "{good}", "--output", "/proc/x.jsonl"],
     "--output /proc/x.jsonl: cannot be written: no file can be written in /proc"),
    (["download", "--root", "{good}"], "--root {good}: not a project folder: {good} is a file, not a folder"),
    (["download", "--root", "{good}/project"], "--root {good}/project: not a project folder: {good} is a file"),
])
def test_an_output_or_root_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys, argv, message):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    argv = [a.format(good=good) for a in argv]
    assert main(["--root", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(good=good)}") and err.count("\n") == 1
    assert good.is_file() and not (tmp_path / "data").exists()


def test_a_path_the_system_refuses_during_a_step_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    from rm_lib import cli

    def refused(step, params, layout):
        raise PermissionError(13, "Permission denied", str(tmp_path / "data/pairs"))

    monkeypatch.setattr(cli, "_run_step", refused)
    assert main(["--root", str(tmp_path), "download"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'data/pairs'}: Permission denied\n"


@pytest.mark.parametrize("error, named", [
    # a copy that ran out of room: where it was going, not the model it read (shutil.copy2 names both)
    (OSError(28, "No space left on device", "models/reward_model/model.safetensors", None, "data/release/x"),
     "data/release/x"),
    (OSError(27, "File too large", "models/reward_model/model.safetensors", None, "data/release/x"),  # ulimit -f
     "data/release/x"),
    (OSError(28, "No space left on device"), "a write that named no file (the project folder {root}, a cache such "
                                             "as ~/.cache, or {tmp})"),
    (OSError(30, "Read-only file system"), "a write that named no file (the project folder {root}, a cache such as "
                                           "~/.cache, or {tmp})"),
])
def test_a_full_disk_during_a_step_is_one_line_naming_where(tmp_path, capsys, monkeypatch, error, named):
    from rm_lib import cli

    def full(step, params, layout):
        raise error

    monkeypatch.setattr(cli, "_run_step", full)
    assert main(["--root", str(tmp_path), "download"]) == 2
    import tempfile

    where = named.format(root=tmp_path, tmp=tempfile.gettempdir())
    assert capsys.readouterr().err == f"error: {where}: {error.strerror}\n"


def test_an_os_error_that_names_no_path_and_is_no_storage_failure_keeps_its_traceback(tmp_path, monkeypatch):
    from rm_lib import cli

    def broken(step, params, layout):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(cli, "_run_step", broken)
    with pytest.raises(ConnectionResetError):  # a bug or a network failure: its traceback says where
        main(["--root", str(tmp_path), "download"])


@pytest.mark.parametrize("step", ["download", "train", "run", "score", "show-tokens"])
def test_the_help_after_a_step_reads_as_the_top_level_help(step, capsys):
    with pytest.raises(SystemExit):
        main([step, "--help"])
    text = capsys.readouterr().out
    assert "STEP_" not in text and "--params PARAMS" in text and "--root ROOT" in text
    from rm_lib.cli import _parser

    step_parser = next(a for a in _parser()._actions if a.dest == "step").choices[step]
    assert all(action.help for action in step_parser._actions), [a.dest for a in step_parser._actions if not a.help]


def test_a_section_or_setting_written_twice_in_params_yaml_is_refused_naming_both_lines(tmp_path, capsys):
    """yaml.safe_load kept the last: a `train:` section added at the end lost the learning rate edited above,
    without a word."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\ndownload:\n  demo_pairs: 40\ntrain:\n  max_steps: 5\n")
    with pytest.raises(SettingsError, match=f"^{path}: not valid YAML at line 5: 'train' is written twice "
                                            r"\(also at line 1\): keep one$"):
        load_params(path)
    path.write_text("train:\n  max_steps: 5\n  max_steps: 6\n")
    with pytest.raises(SettingsError, match=r"line 3: 'max_steps' is written twice \(also at line 2\)"):
        load_params(path)
    assert main(["--params", str(path), "--root", str(tmp_path), "download"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "data").exists()
    # an anchor's keys merged with `<<` may still be overridden: that is what merging is for
    path.write_text("base: &base\n  max_steps: 5\ntrain:\n  <<: *base\n  max_steps: 6\n")
    with pytest.raises(SettingsError, match="unknown section"):  # base is no section: read, then refused
        load_params(path)


def test_root_reads_the_projects_own_params_yaml_and_a_missing_params_file_is_refused(tmp_path, monkeypatch,
                                                                                     capsys):
    """From another folder, `--root <project>` read the current folder's params.yaml (or none): the built-in
    defaults ran and replaced the project's data with the demo's 2,000 pairs. A --params path that is not
    there ran the defaults too."""
    import json

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "params.yaml").write_text("download:\n  demo_pairs: 40\n")
    monkeypatch.chdir(elsewhere)
    assert main(["download", "--root", str(project)]) == 0
    manifest = json.loads((project / "data/pairs/manifest.json").read_text())
    assert manifest["rows_read"] == 40
    # the current folder's params.yaml still serves a --root that has none (a scratch folder)
    (elsewhere / "params.yaml").write_text("download:\n  demo_pairs: 30\n")
    assert main(["download", "--root", str(tmp_path / "scratch")]) == 0
    manifest = json.loads((tmp_path / "scratch/data/pairs/manifest.json").read_text())
    assert manifest["rows_read"] == 30
    capsys.readouterr()
    assert main(["download", "--root", str(project), "--params", str(tmp_path / "typo/params.yaml")]) == 2
    assert capsys.readouterr().err == f"error: --params {tmp_path / 'typo/params.yaml'}: no such file\n"


@pytest.mark.timeout(60)
def test_a_yaml_alias_bomb_is_one_short_line_not_a_hang(tmp_path):
    """A 480-byte params.yaml (or --set value) of nested aliases: the error message printed the value whole,
    9**9 items, and the process grew past 6 GB until it was killed."""
    bomb = alias_bomb()
    (tmp_path / "params.yaml").write_text(f"download: {bomb}\n")
    with pytest.raises(SettingsError, match="download: expected a mapping of settings, got list") as info:
        load_params(tmp_path / "params.yaml")
    assert len(str(info.value)) < 2_000
    with pytest.raises(SettingsError, match="train.lora_target_modules: must be null") as info:
        load_params(None, [f"train.lora_target_modules={bomb}"])
    assert len(str(info.value)) < 2_000


def test_a_setting_or_section_named_by_a_number_is_one_line(tmp_path):
    """YAML reads `1:` as a number: the list of unknown names failed to sort and join (a traceback)."""
    (tmp_path / "params.yaml").write_text("train:\n  1: 2\n")
    with pytest.raises(SettingsError, match="train: unknown setting\\(s\\) 1; known: "):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("1: {}\nmodel: {}\n")
    with pytest.raises(SettingsError, match="unknown section\\(s\\) 1; known: model"):
        load_params(tmp_path / "params.yaml")


def test_settings_nested_deeper_than_yaml_reads_are_one_line(tmp_path):
    """A params.yaml (or --set value) of lists a thousand deep: yaml's reader ended in a RecursionError."""
    (tmp_path / "params.yaml").write_text("train: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(SettingsError, match="params.yaml: nested deeper than YAML is read"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(SettingsError, match="--set .*: nested deeper than YAML is read"):
        load_params(None, ["train.max_steps=" + "[" * 1000 + "]" * 1000])


def test_trls_setting_names_are_refused_naming_the_setting_that_does_it_here(tmp_path, capsys):
    """A TRL user's names (max_length, per_device_train_batch_size, bf16) were refused with the list of keys
    alone: each now says which setting of this project does what it did in TRL."""
    assert main(["--root", str(tmp_path), "train", "--set", "max_length=512"]) == 2
    assert "(TRL's max_length is filter.max_token_length here)" in capsys.readouterr().err
    assert main(["--root", str(tmp_path), "train", "--set", "train.per_device_train_batch_size=8",
                 "--set", "train.bf16=true", "--set", "train.learning_rate=1e-5"]) == 2
    assert ("train: unknown setting(s) bf16, per_device_train_batch_size (TRL's bf16 is train.mixed_precision=bf16 "
            "here; TRL's per_device_train_batch_size is train.batch_size here); known: ") in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("num_train_epochs: 2\n")
    assert main(["--root", str(tmp_path), "train"]) == 2
    assert "unknown section(s) num_train_epochs (TRL's num_train_epochs is train.num_epochs here)" in \
        capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("filter:\n  max_length: 512\n")  # the right section, TRL's name
    assert main(["--root", str(tmp_path), "train"]) == 2
    assert "(TRL's max_length is filter.max_token_length here)" in capsys.readouterr().err
