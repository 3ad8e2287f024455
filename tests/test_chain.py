
"""Each step refuses input made from other data than the folder upstream holds now, and names
the step to rerun; the normal chain download -> ... -> push passes."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from rm_lib import cli
from rm_lib.errors import UserError
from rm_lib.files import read_json, write_json
from rm_lib.layout import Layout
from rm_lib.model.modeling import DEFAULT_MODEL_HUB_ID
from rm_lib.pipeline.chain import StaleInput, check_tokenized_for

from helpers import run_steps, tiny_params

REPO = Path(__file__).resolve().parents[1]


def _refused(params, root, step: str) -> str:
    with pytest.raises(UserError) as info:
        run_steps(params, root, step)
    return str(info.value)


def test_filter_refuses_tokens_of_other_pairs(tmp_path, tiny_decoder):
    layout = Layout(tmp_path)
    first = tiny_params(model=str(tiny_decoder))
    run_steps(first, tmp_path, "download", "tokenize")
    tokens_before = read_json(layout.tokenized / "manifest.json")
    # another data set arrives; tokenize is killed (or not run) before it writes anything
    run_steps(tiny_params("download.demo_pairs=50", "download.seed=7", model=str(tiny_decoder)), tmp_path, "download")
    assert read_json(layout.tokenized / "manifest.json") == tokens_before
    message = _refused(first, tmp_path, "filter")
    assert message == f"{layout.tokenized} was made from other pairs than {layout.pairs} holds now; rerun tokenize"
    assert not layout.filtered.exists()


def test_train_refuses_token_ids_another_models_tokenizer_made(tmp_path, tiny_decoder):
    """tokenize with the tiny decoder, then train with MiniLM (model.name_or_path changed between steps
    run one by one): the ids would index MiniLM's embeddings as other words, and it trained on them."""
    layout = Layout(tmp_path)
    run_steps(tiny_params(model=str(tiny_decoder)), tmp_path, "download", "tokenize", "filter")
    message = _refused(tiny_params(model="default"), tmp_path, "train")
    assert message == (f"{layout.tokenized} holds token ids made by the tokenizer of '{tiny_decoder}' "
                       f"({layout.tokenized / 'manifest.json'}), and model.name_or_path is 'default'; rerun "
                       "tokenize, then filter (or set model.name_or_path back)")
    assert not layout.model.exists()
    assert "rerun tokenize" in _refused(tiny_params(model="default"), tmp_path, "filter")
    # the same name at another revision (a Hub model's tokenizer may differ between commits)
    manifest = layout.tokenized / "manifest.json"
    recorded = read_json(manifest)
    assert recorded["revision"] is None
    write_json(manifest, {**recorded, "revision": "abc123"})
    message = _refused(tiny_params(model=str(tiny_decoder)), tmp_path, "train")
    assert "at revision 'abc123'" in message and "model.revision is None" in message
    write_json(manifest, recorded)
    # the same model named another way is the same model
    alias = tmp_path / "alias"
    alias.symlink_to(tiny_decoder)
    run_steps(tiny_params("train.max_steps=1", model=str(alias)), tmp_path, "filter", "train")
    assert layout.model.exists()
    # 'default' is the model its Hub id names (a Hub load of it would read the same tokenizer)
    write_json(manifest, {**recorded, "model": "default"})
    check_tokenized_for(layout, DEFAULT_MODEL_HUB_ID, None, "train")
    with pytest.raises(StaleInput, match="tokenizer of 'default'"):
        check_tokenized_for(layout, "sentence-transformers/all-mpnet-base-v2", None, "train")


def test_cli_refusal_is_one_line_exit_2(tmp_path, tiny_decoder, capsys):
    run_steps(tiny_params(model=str(tiny_decoder)), tmp_path, "download", "tokenize", "filter")
    run_steps(tiny_params("download.seed=3", model=str(tiny_decoder)), tmp_path, "download")
    code = cli.main(["--root", str(tmp_path), "--set", f"model.name_or_path={tiny_decoder}", "train"])
    err = capsys.readouterr().err
    layout = Layout(tmp_path)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {layout.tokenized} was made from other pairs than {layout.pairs} "
                                        "holds now; rerun tokenize, then filter"]
    assert not layout.model.exists()


def test_the_chain_records_each_input_and_refuses_stale_model_and_evaluation(tmp_path, tiny_decoder):
    layout = Layout(tmp_path)
    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate", "push")
    pairs, tokens = read_json(layout.pairs / "manifest.json"), read_json(layout.tokenized / "manifest.json")
    filtered, model = read_json(layout.filtered / "manifest.json"), read_json(layout.model / "rm_lib.json")
    assert tokens["inputs"] == {"pairs": pairs["content_hash"]}
    assert filtered["inputs"] == {"tokenized": tokens["content_hash"]}
    assert model["inputs"] == {"filtered": filtered["content_hash"]}
    assert re.fullmatch(r"[0-9a-f]{64}", model["content_hash"])
    assert read_json(layout.evaluation / "report.json")["inputs"] == {"model": model["content_hash"]}

    # a new model (other settings): the evaluation on disk is of the old one
    run_steps(tiny_params("train.max_steps=3", model=str(tiny_decoder)), tmp_path, "train")
    assert _refused(params, tmp_path, "push") == (f"{layout.evaluation} was made from another model than "
                                                  f"{layout.model} holds now; rerun evaluate")
    # other filtered pairs: the model on disk was trained on the old ones
    run_steps(tiny_params("filter.max_token_length=24", "filter.max_prompt_token_length=12",
                          "filter.policy=truncate", model=str(tiny_decoder)), tmp_path, "filter")
    assert read_json(layout.filtered / "manifest.json")["content_hash"] != filtered["content_hash"]
    assert _refused(params, tmp_path, "evaluate") == (f"{layout.model} was made from other filtered pairs than "
                                                      f"{layout.filtered} holds now; rerun train")
    assert _refused(params, tmp_path, "push") == (f"{layout.model} was made from other filtered pairs than "
                                                  f"{layout.filtered} holds now; rerun train, then evaluate")


def test_push_refuses_a_training_summary_of_another_run_and_evaluate_an_unhashed_model(tmp_path, tiny_decoder):
    """train killed after saving the model and before its summary: the card would quote the old run.
    A model saved before models recorded their content hash: nothing could say which one was scored."""
    import json

    layout = Layout(tmp_path)
    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    summary = layout.train_logs / "summary.json"
    summary.write_text(json.dumps({**read_json(summary), "fingerprint": "an-older-run"}))
    assert _refused(params, tmp_path, "push") == (f"{summary} describes another training run than {layout.model} "
                                                  "holds; rerun train")
    record = layout.model / "rm_lib.json"
    record.write_text(json.dumps({k: v for k, v in read_json(record).items() if k != "content_hash"}))
    assert _refused(params, tmp_path, "evaluate") == (f"{record} records no content hash (an older rm_lib wrote it); "
                                                      "rerun train")


def test_a_manifest_without_inputs_is_refused(tmp_path, tiny_decoder):
    """Written by an rm_lib from before the chain was recorded: nothing says what it was made from."""
    import json

    layout = Layout(tmp_path)
    params = tiny_params(model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize")
    manifest = layout.tokenized / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in read_json(manifest).items() if k != "inputs"}))
    assert _refused(params, tmp_path, "filter") == (f"{manifest} does not record which pairs it was made from "
                                                    "(an older rm_lib wrote it); rerun tokenize")


def beside(params, root: Path, step: str) -> None:
    """`step` run beside the one under test, as a writer no lock stops would (another machine sharing the
    folder): a step run here is refused while another one runs."""
    from rm_lib import steps

    steps.module(step).run(params, Layout(root))


def test_a_model_replaced_while_evaluate_scores_it_is_refused(tmp_path, tiny_decoder, monkeypatch):
    """A train that finishes while evaluate scores the model: the report would name the new model
    with the old one's figures, and push would release the new one with them."""
    import shutil

    from rm_lib.steps import evaluate

    layout = Layout(tmp_path)
    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    shutil.copytree(layout.model, tmp_path / "first-model")
    run_steps(tiny_params("train.max_steps=3", model=str(tiny_decoder)), tmp_path, "train")
    report = (layout.evaluation / "report.json").read_bytes()

    def train_finishes(*args, **kwargs):  # the model folder becomes another one while it is scored
        shutil.rmtree(layout.model)
        shutil.copytree(tmp_path / "first-model", layout.model)
        return real_check(*args, **kwargs)

    real_check = evaluate.consistency.check
    monkeypatch.setattr(evaluate.consistency, "check", train_finishes)
    assert "was replaced while it was scored (a train finished meanwhile" in \
        _refused(params, tmp_path, "evaluate")
    assert (layout.evaluation / "report.json").read_bytes() == report


def test_a_download_while_evaluate_scores_fails_it_and_keeps_the_last_report(tmp_path, tiny_decoder, monkeypatch):
    """evaluate read the pairs' manifest (the source it names) after scoring: a download of another source
    meanwhile stamped the demo pairs' figures with that source, and the release gate then compared the
    next model with nothing (the last release was "of another source")."""
    from rm_lib.steps import ChangedWhileRunning, evaluate

    layout = Layout(tmp_path)
    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    report = (layout.evaluation / "report.json").read_bytes()
    source = tmp_path / "other.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                              for i in range(30)))

    def download_meanwhile(*args, **kwargs):
        beside(tiny_params(f"download.source={source}", model=str(tiny_decoder)), tmp_path, "download")
        return real_folder(*args, **kwargs)

    real_folder = evaluate.evaluate_folder
    monkeypatch.setattr(evaluate, "evaluate_folder", download_meanwhile)
    with pytest.raises(ChangedWhileRunning, match=r"evaluate: its input \(.*data/pairs/manifest.json\) changed"):
        run_steps(params, tmp_path, "evaluate")
    assert (layout.evaluation / "report.json").read_bytes() == report


@pytest.mark.parametrize("change", ["replaced", "appended", "added to the folder"])
def test_a_source_changed_while_download_reads_it_fails_the_download(tmp_path, monkeypatch, change):
    """The pairs came from the source as it was, and `dvc repro` then locked the new file as their source
    (`dvc status`: up to date). The download fails, naming the file, so nothing records it."""
    from rm_lib.data import sources
    from rm_lib.steps import ChangedWhileRunning

    folder = tmp_path / "src"
    source = folder / "pairs.jsonl"
    write_pairs = lambda path, n: path.write_text("".join(  # noqa: E731
        json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(n)))
    folder.mkdir()
    write_pairs(source, 40)
    real_read = sources.read_file

    def change_meanwhile(path, *args, **kwargs):
        if change == "replaced":
            write_pairs(tmp_path / "new.jsonl", 30)
            os.replace(tmp_path / "new.jsonl", source)
        elif change == "appended":
            with open(source, "a") as handle:
                handle.write(json.dumps({"prompt": "late", "chosen": "yes", "rejected": "no"}) + "\n")
        else:
            write_pairs(folder / "more.jsonl", 30)
        yield from real_read(path, *args, **kwargs)

    monkeypatch.setattr(sources, "read_file", change_meanwhile)
    named = folder / ("more.jsonl" if change.startswith("added") else "pairs.jsonl")
    with pytest.raises(ChangedWhileRunning, match=rf"download: its input \(.*{named.name}.*\) changed while it ran"):
        run_steps(tiny_params(f"download.source={folder}"), tmp_path, "download")


def test_a_model_replaced_after_the_release_gate_is_not_released(tmp_path, tiny_decoder, monkeypatch):
    import json

    from rm_lib.steps import push

    layout = Layout(tmp_path)
    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    real_gate = push.gate

    def gate_then_train_finishes(*args):
        verdicts = real_gate(*args)
        record = layout.model / "rm_lib.json"
        record.write_text(json.dumps({**read_json(record), "content_hash": "f" * 64}))
        return verdicts

    monkeypatch.setattr(push, "gate", gate_then_train_finishes)
    assert "is not the model data/evaluation/report.json was made of" in _refused(params, tmp_path, "push")
    assert not layout.release.exists()


@pytest.mark.parametrize("change", ["input", "tokenized", "code", "settings under dvc repro"])
def test_a_step_whose_input_or_code_changed_while_it_ran_fails_so_nothing_records_it(tmp_path, tiny_decoder,
                                                                                     monkeypatch, change):
    """DVC hashes a stage's code and input once the stage ended, and so does the Dagster record: a filter
    run beside a training run, or an edit of the training code meanwhile, would have dvc.lock and the
    run cache name a model made from data or code it never saw (a step run beside another in one folder is
    refused at its start, but a writer no lock stops, on another machine that shares the folder, is not).
    Such a run fails (exit 2 under `dvc repro`: nothing is recorded); the model stays, its own record naming
    what it was made from."""
    import rm_lib.steps as steps
    from rm_lib.steps import ChangedWhileRunning
    from rm_lib.steps import train as train_step

    params = tiny_params("train.max_steps=1", model=str(tiny_decoder))
    layout = Layout(tmp_path)
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    filtered = read_json(layout.filtered / "manifest.json")["content_hash"]
    real_train, real_hash = train_step.run, steps.code_hash
    edited = []

    def train_while_something_changes(*args, **kwargs):
        result = real_train(*args, **kwargs)
        if change == "input":  # a filter with other settings finishes while train runs
            beside(tiny_params("filter.max_token_length=48", model=str(tiny_decoder)), tmp_path, "filter")
        elif change == "code":
            edited.append(True)
        elif change.startswith("settings"):  # params.yaml edited for the next run while `dvc repro` trains
            text = (tmp_path / "params.yaml").read_text()
            (tmp_path / "params.yaml").write_text(text.replace("learning_rate: 5.0e-05", "learning_rate: 1.0e-04"))
        return result

    if change.startswith("settings"):
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copy(REPO / name, tmp_path / name)
        assert "learning_rate: 5.0e-05" in (tmp_path / "params.yaml").read_text()
        monkeypatch.setenv("DVC_STAGE", "train")
        monkeypatch.setenv("DVC_ROOT", str(tmp_path))

    real_fit = train_step.fit

    def fit_while_tokenize_runs(*args, **kwargs):  # train reads its template; DVC hashes it as train's input
        beside(tiny_params("tokenize.template=chatml", model=str(tiny_decoder)), tmp_path, "tokenize")
        return real_fit(*args, **kwargs)

    if change == "tokenized":
        monkeypatch.setattr(train_step, "fit", fit_while_tokenize_runs)
    monkeypatch.setattr(train_step, "run", train_while_something_changes)
    monkeypatch.setattr(steps, "code_hash", lambda name: real_hash(name) + ("-edited" * len(edited)))
    with pytest.raises(ChangedWhileRunning) as info:
        steps.run("train", params, layout)
    what = {"input": f"its input ({layout.filtered / 'manifest.json'})",
            "tokenized": f"its input ({layout.tokenized / 'manifest.json'})",
            "code": "the code of train"}.get(change, "the settings of the DVC stage train")
    assert str(info.value).startswith(f"train: {what}") and str(info.value).endswith("rerun train")
    assert read_json(layout.model / "rm_lib.json")["inputs"]["filtered"] == filtered  # the model says what it saw
    # and the template it was trained with, read before training, not the one written meanwhile
    assert read_json(layout.model / "rm_lib.json")["template"] != "chatml"


def test_a_model_folder_a_killed_dvc_checkout_left_is_neither_evaluated_nor_released(tmp_path, tiny_decoder,
                                                                                       monkeypatch):
    """A killed `dvc checkout` or `dvc pull` deletes the model's files before it writes the new ones and leaves
    its `.<random>.tmp` copies behind: push released the weightless folder ("release gate passed", exit 0),
    and the copies with it. rm_lib.json records each file's hash, so the message names the file; files train
    did not write (a finder's .DS_Store, notes) are no part of the model and stay out of the release."""
    from rm_lib.pipeline import chain
    from rm_lib.steps import push

    layout = Layout(tmp_path)
    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    record = read_json(layout.model / "rm_lib.json")
    assert set(record["files"]) == {p.name for p in layout.model.iterdir()} - {"rm_lib.json"}
    (layout.model / ".8DIN5MR7HBsWVSoWgrPXRw.tmp").write_bytes(b"\0" * 1000)  # a copy DVC was writing
    (layout.model / ".DS_Store").write_bytes(b"\0")
    (layout.model / "notes.txt").write_text("tried lr 1e-4 first")
    run_steps(params, tmp_path, "push")
    released = {p.name: p.read_bytes() for p in layout.release.iterdir()}
    assert not {".8DIN5MR7HBsWVSoWgrPXRw.tmp", ".DS_Store", "notes.txt"} & set(released)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "rm_lib.json"):
        assert name in released
    assert released["model.safetensors"] == (layout.model / "model.safetensors").read_bytes()

    def damaged(name: str, change) -> dict[str, str]:
        path = layout.model / name
        kept = path.read_bytes()
        change(path)
        try:
            return {step: _refused(params, tmp_path, step) for step in ("evaluate", "push")}
        finally:
            path.write_bytes(kept)

    after = " (an interrupted `dvc checkout` or `dvc pull` leaves such a folder); rerun train{}"
    for name, change, what in (("model.safetensors", Path.unlink, "lacks model.safetensors: deleted since train "
                                                                  "wrote it"),
                               ("config.json", Path.unlink, "lacks config.json: deleted since train wrote it"),
                               ("tokenizer.json", lambda p: p.write_text("{}"),
                                "holds tokenizer.json changed since train wrote it")):
        messages = damaged(name, change)
        start = f"{layout.model} {what}"
        assert messages == {"evaluate": start + after.format(""), "push": start + after.format(", then evaluate")}
    assert {p.name: p.read_bytes() for p in layout.release.iterdir()} == released
    # where DVC keeps the model, its checkout is named too
    assert chain.checkout_hint(layout) == ""
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert chain.checkout_hint(layout) == ", or let `dvc checkout -f` put back the model dvc.lock records"
    (tmp_path / "dvc.lock").unlink()
    # a model recorded before the files were: the folder's files as a whole
    legacy = {k: v for k, v in record.items() if k != "files"}
    weights = layout.model / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()
    assert chain.model_files_differ(layout.model, legacy).startswith("lacks its weights (no model.safetensors): ")
    weights.write_bytes(kept)
    assert chain.model_files_differ(layout.model, legacy).startswith("holds other files")  # notes.txt: which is not
    (layout.model / "notes.txt").unlink()  # known without the record
    assert chain.model_files_differ(layout.model, legacy) is None  # the hidden files aside
    # a file deleted after the chain's check, as the release is copied: the copy is checked too
    real_gate = push.gate
    config = (layout.model / "config.json").read_bytes()

    def gate_then_deleted(*args):
        verdicts = real_gate(*args)
        (layout.model / "config.json").unlink()
        return verdicts

    monkeypatch.setattr(push, "gate", gate_then_deleted)
    assert _refused(params, tmp_path, "push") == (f"push: {layout.model} lacks config.json: deleted as the release "
                                                  "was copied; data/release and the Hub are unchanged. Run train and "
                                                  "evaluate")
    (layout.model / "config.json").write_bytes(config)
    monkeypatch.setattr(push, "gate", real_gate)  # or changed as it is copied: the copy's hashes are checked
    real_copy = push.shutil.copyfile

    def copy_then_changed(source, target):
        real_copy(source, target)
        if Path(target).name == "tokenizer.json":
            Path(target).write_text("{}")

    monkeypatch.setattr(push.shutil, "copyfile", copy_then_changed)
    message = _refused(params, tmp_path, "push")
    assert message.startswith(f"push: {layout.model} holds tokenizer.json changed since train wrote it")
    assert {p.name: p.read_bytes() for p in layout.release.iterdir()} == released


def test_a_model_whose_file_names_sort_otherwise_as_text_is_the_same_model(tmp_path):
    """rm_lib.json keeps the files by name as text ("adapter-x.txt" before "adapter/..."), train hashed them
    by path parts ("adapter/..." first): read back in the JSON's order, an unchanged model was refused."""
    from rm_lib.pipeline.chain import file_record, model_files_differ

    model = tmp_path / "model"
    (model / "adapter").mkdir(parents=True)
    for name in ("adapter/adapter_config.json", "adapter.json", "adapter-x.txt", "model.safetensors", "config.json"):
        (model / name).write_text(name)
    files, digest = file_record(model)
    write_json(model / "rm_lib.json", {"files": files, "content_hash": digest})
    record = read_json(model / "rm_lib.json")
    assert list(record["files"]) != list(files)  # the JSON's order is another
    assert model_files_differ(model, record) is None
    (model / "adapter.json").write_text("changed")
    assert model_files_differ(model, record).startswith("holds adapter.json changed since train wrote it")


@pytest.mark.parametrize("damage", ["deleted", "cut short", "replaced by other rows"])
def test_input_files_changed_since_their_step_wrote_them_name_that_step(tmp_path, tiny_decoder, damage):
    """The records agree with each other, but the file a step reads is not the one its record describes:
    one line naming the step to rerun, instead of a traceback (a missing or truncated Parquet file) or a
    silent read of other rows that the output would then claim to be made from the recorded ones."""
    import pyarrow.parquet as pq

    params = tiny_params(model=str(tiny_decoder))
    layout = Layout(tmp_path)
    run_steps(params, tmp_path, "download", "tokenize")
    path = layout.tokenized / "train.parquet"
    if damage == "deleted":
        path.unlink()
    elif damage == "cut short":
        path.write_bytes(path.read_bytes()[:100])
    else:
        pq.write_table(pq.read_table(path).slice(0, 5), path)
    message = _refused(params, tmp_path, "filter")
    expected = "is missing" if damage == "deleted" else "holds other files than its manifest.json records"
    assert expected in message and message.endswith("rerun tokenize")
    assert not layout.filtered.exists()


def test_an_unreadable_parquet_file_is_one_line_naming_it(tmp_path):
    from rm_lib.data.tokenstore import read_rows
    from rm_lib.errors import DataError

    broken = tmp_path / "train.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"file {re.escape(str(broken))}: not a readable Parquet file"):
        read_rows(broken)
    with pytest.raises(DataError, match="no such file; run the step that writes it first"):
        read_rows(tmp_path / "missing.parquet")


def test_push_without_its_report_or_over_a_link_to_nothing_names_the_file_and_the_mend(tmp_path, tiny_decoder):
    """A deleted report.json failed the release gate, whose advice (push.force) failed in turn; a record that is
    a DVC cache link to nothing (a project moved with cache.type symlink) was "not found; run the step that
    writes it", where rerunning every step was no mend and `dvc checkout -f` is."""
    params = tiny_params(model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    layout = Layout(tmp_path)
    report = layout.evaluation / "report.json"
    kept = report.read_bytes()
    report.unlink()
    said = _refused(params, tmp_path, "push")
    assert said.startswith(f"{report} is missing: the evaluation the release gate judges; run evaluate") and \
        "push.force" not in said
    report.write_bytes(kept)
    run = layout.train_logs / "run.json"
    run.unlink()
    run.symlink_to(tmp_path / "elsewhere" / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef")
    said = _refused(params, tmp_path, "push")
    assert f"{run} is a link to {tmp_path / 'elsewhere'}" in said and "`dvc checkout -f` links it again" in said
    with pytest.raises(UserError, match="which is not there .*`dvc checkout -f` links it again"):
        read_json(run)
