import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rm_lib.files import read_json, read_jsonl
from rm_lib.layout import Layout
from rm_lib.settings import load_params
from rm_lib.training import distributed, trainer

from helpers import fit_tiny, run_steps, tiny_params

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def same_weights(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def test_pipeline_trains_evaluates_scores_and_publishes(tmp_path, tiny_decoder):
    params = tiny_params("train.max_steps=3", "train.center_rewards_coefficient=0.01", model=str(tiny_decoder))
    res = run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate", "push")
    assert res["train"].steps == 3
    lines = read_jsonl(tmp_path / "data/train/metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"loss", "accuracy", "reward_margin", "grad_norm", "learning_rate", "tokens_per_s"} <= set(lines[0])
    report = read_json(tmp_path / "data/evaluation/report.json")
    assert {"accuracy", "tie_rate", "longer_wins_baseline", "per_length_bucket"} <= set(report)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "models/reward_model")
    assert config.num_labels == 1 and hasattr(config, "reward_mean") and hasattr(config, "reward_std")
    assert (tmp_path / "data/release/README.md").read_text().count("longer-wins baseline") == 1
    assert res["push"].uploaded is False
    # What each step returns (the CLI line, the Dagster metadata) is what it wrote down, field for field.
    for step, folder in (("download", "data/pairs"), ("tokenize", "data/tokenized"), ("filter", "data/filtered")):
        assert read_json(tmp_path / folder / "manifest.json") == res[step].manifest()
    assert read_json(tmp_path / "data/filtered/manifest.json")["dropped_by_reason"] == res["filter"].dropped
    assert read_json(tmp_path / "data/train/run.json") == res["train"].run_record()
    assert read_json(tmp_path / "data/train/summary.json") == res["train"].summary_record()
    plan = read_json(tmp_path / "data/train/summary.json")["device_plan"]  # how the run used its device
    assert plan["tokens_per_forward"] == 8192 and plan["gradient_checkpointing"] is False
    assert plan["predicted_peak_mib"] is None and plan["why"] == "on a CPU"  # GPU memory is planned on a GPU
    assert plan["attention"] == "sdpa"  # the model's own, named as the log names it
    import torch

    # what decides how the sums round, which the card names beside its claim that a run again remakes it
    arithmetic = plan["arithmetic"]
    assert (arithmetic["torch"], arithmetic["threads"]) == (torch.__version__, torch.get_num_threads())
    assert arithmetic["device"].startswith("cpu")
    card = (tmp_path / "data/release/README.md").read_text()
    threads = f"{arithmetic['threads']} thread" + ("" if arithmetic["threads"] == 1 else "s")
    assert (f"| arithmetic (torch build, device, threads: what decides how the sums round) | torch "
            f"`{torch.__version__}` on `{arithmetic['device']}`, {threads} |") in card
    assert read_json(tmp_path / "data/evaluation/report.json") == res["evaluate"].report_record()
    assert read_json(tmp_path / "data/evaluation/metrics.json")["accuracy"] == res["evaluate"].metrics["accuracy"]
    from rm_lib.steps.train import result_from_summary  # how Dagster reads back a run made in a subprocess

    assert result_from_summary(Layout(tmp_path)) == res["train"]

    # evaluate and push again under other settings: the report and the card name the data and the
    # settings the model was made with, as the steps that made it recorded them, not params.yaml now
    other = tiny_params("train.max_steps=3", "download.source=data/sources/other.jsonl", "filter.max_token_length=48",
                        "tokenize.template=simple_chat", "evaluate.batch_size=4", model=str(tiny_decoder))
    run_steps(other, tmp_path, "evaluate", "push")
    report = read_json(tmp_path / "data/evaluation/report.json")
    assert report["demo_data"] is True and report["data_source"] == "demo"
    card = (tmp_path / "data/release/README.md").read_text()
    assert "Dataset: `demo`: 60 built-in synthetic pairs" in card and "other.jsonl" not in card
    settings = json.loads(card.split("```json\n", 1)[1].split("```", 1)[0])
    assert settings["filter"]["max_token_length"] == 64 and settings["download"]["source"] == "demo"
    assert settings["tokenize"] == params.as_dict()["tokenize"] and settings["evaluate"]["batch_size"] == 4


def test_training_is_seeded_and_reproducible(tmp_path, tiny_decoder):
    params = tiny_params("train.max_steps=3", model=str(tiny_decoder))
    run_steps(params, tmp_path / "a", "download", "tokenize", "filter", "train")
    run_steps(params, tmp_path / "b", "download", "tokenize", "filter", "train")
    assert same_weights(weights(tmp_path / "a/models/reward_model"), weights(tmp_path / "b/models/reward_model"), 0)


def _cli(root: Path, *args: str, launcher: list[str] | None = None) -> subprocess.Popen:
    base = launcher or [sys.executable, "-m", "rm_lib"]
    return subprocess.Popen(base + ["--root", str(root), "--params", str(root / "params.yaml"), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _prepare(root: Path, model: str, *extra: str) -> None:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    settings = {"model": {"name_or_path": model}, "download": {"demo_pairs": 120},
                "filter": {"max_token_length": 64, "max_prompt_token_length": 32},
                "train": {"max_steps": 8, "batch_size": 4, "logging_steps": 1, "save_steps": 1,
                          "save_total_limit": 2}}
    for item in extra:
        key, value = item.split("=")
        section, name = key.split(".")
        settings.setdefault(section, {})[name] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(settings))
    # the data steps in this process (the CLI's own code path, without three interpreter starts a run): the
    # tests launch train
    run_steps(load_params(root / "params.yaml"), root, "download", "tokenize", "filter")


@pytest.mark.integration
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path, minilm_path):
    _prepare(tmp_path / "whole", "default")
    _prepare(tmp_path / "killed", "default")
    whole = _cli(tmp_path / "whole", "train")
    assert whole.wait() == 0, whole.stdout.read()

    killed = _cli(tmp_path / "killed", "train")
    checkpoints = tmp_path / "killed/models/checkpoints"
    deadline = time.time() + 300
    while not any(checkpoints.glob("step-[3-9]")) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, f"training ended before it could be killed: {killed.stdout.read()[-2000:]}"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed/models/reward_model").exists()
    resumed = _cli(tmp_path / "killed", "train")
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    assert len(list(checkpoints.glob("step-*"))) <= 2  # retention keeps the newest two
    whole_weights, resumed_weights = (weights(tmp_path / f"{run}/models/reward_model") for run in ("whole", "killed"))
    assert whole_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(whole_weights[k], resumed_weights[k]) for k in whole_weights)  # bit for bit
    records = read_jsonl(tmp_path / "killed/data/train/metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))  # the metrics file continues where the checkpoint was
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0  # seconds of training over both sessions, never reset


def _records(root):
    records = read_jsonl(root / "data/train/metrics.jsonl")
    evals = [{k: v for k, v in r.items() if k.startswith("eval_")} for r in records if "eval_accuracy" in r]
    summary = read_json(root / "data/train/summary.json")
    return ([r["loss"] for r in records if "loss" in r], evals,
            (summary["reward_mean"], summary["reward_std"], summary["processes"]))


# --multi_gpu picks accelerate's torchrun launcher; without a GPU the train step joins the processes on
# the CPU (gloo). `--cpu` would start a single process.
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rm_lib"]


def _two_process_run(tmp_path, tiny_decoder, *extra: str):
    _prepare(tmp_path / "two", str(tiny_decoder), *SAME_RUN, "train.batch_size=2", *extra)
    two = _cli(tmp_path / "two", "train", launcher=TWO_PROCESSES)
    out = two.communicate()[0]
    assert two.returncode == 0, out
    return _records(tmp_path / "two")


# an odd number of held-out pairs, so one process's share is padded for the gather
SAME_RUN = ("train.max_steps=4", "train.eval_steps=2", "download.test_fraction=0.1", "download.demo_pairs=130")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_decoder):
    """The one-process run a two-process test compares with, trained once for each settings the module's
    tests ask for: (settings...) -> its project folder."""
    made: dict[tuple[str, ...], Path] = {}

    def run(*settings: str) -> Path:
        if settings not in made:
            root = tmp_path_factory.mktemp("one-process")
            _prepare(root, str(tiny_decoder), *settings)
            one = _cli(root, "train")
            assert one.wait() == 0, one.stdout.read()
            made[settings] = root
        return made[settings]

    return run


@pytest.mark.integration
@pytest.mark.parametrize("attention", ["auto", "varlen"])  # varlen: each process's layout travels through DDP
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_decoder, attention, one_process):
    loss_one, evals_one, stats_one = _records(one_process(*SAME_RUN, "train.batch_size=4"))
    loss_two, evals_two, stats_two = _two_process_run(tmp_path, tiny_decoder, f"train.attention={attention}")
    assert loss_two == pytest.approx(loss_one, rel=1e-4, abs=1e-5)
    # evaluation split over both processes and gathered: the same metrics over the same held-out pairs
    assert len(evals_one) == len(evals_two) == 2
    held_out = read_json(tmp_path / "two/data/filtered/manifest.json")["kept"]["test"]
    assert held_out % 2 == 1 and evals_two[0]["eval_pairs"] == held_out
    for a, b in zip(evals_one, evals_two):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    assert stats_two[:2] == pytest.approx(stats_one[:2], rel=1e-4, abs=1e-5)
    assert (stats_one[2], stats_two[2]) == (1, 2)
    assert (tmp_path / "two/models/reward_model/model.safetensors").exists()



@pytest.mark.integration
def test_a_launch_of_two_processes_runs_every_step_but_train_once_on_the_first(tmp_path, tiny_decoder):
    """Every process of `accelerate launch -m rm_lib run` (or evaluate, score) ran download, tokenize,
    filter, evaluate and push in full: evaluate scored every pair twice (slower than one process), each
    summary was printed twice, and the outputs were written from two processes, one without the step's
    lock. The first process runs them, the others wait; train runs on both. A step that fails on the
    first process ends both, with one line saying why."""
    root = tmp_path / "p"
    _prepare(root, str(tiny_decoder), "train.max_steps=2", "train.batch_size=2", "train.save_steps=2",
             "push.force=true")  # past the release gate, which so small a test split fails
    shutil.rmtree(root / "data")  # the launch runs the data steps itself
    launch = _cli(root, "run", launcher=TWO_PROCESSES)
    out = launch.communicate()[0]
    assert launch.returncode == 0, out
    for step in ("download", "tokenize", "filter", "evaluate"):
        assert len(re.findall(rf"^{step}( \(\w+\))?: ", out, flags=re.M)) == 1, (step, out)
    assert out.count("Done. What the run made:") == 1 and "run by the first process" not in out
    summary = read_json(root / "data/train/summary.json")
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert read_json(root / "data/evaluation/report.json")["pairs"] == len(read_jsonl(root / "data/pairs/test.jsonl"))
    scored = _cli(root, "score", "--input", str(root / "data/pairs/test.jsonl"), "--output", str(tmp_path / "s.jsonl"),
                  launcher=TWO_PROCESSES)
    out = scored.communicate()[0]
    assert scored.returncode == 0, out
    assert len(re.findall(r"^score: ", out, flags=re.M)) == 1, out
    assert len(read_jsonl(tmp_path / "s.jsonl")) == len(read_jsonl(root / "data/pairs/test.jsonl"))
    (root / "data/filtered/test.parquet").unlink()  # evaluate refuses on the first process
    failed = _cli(root, "evaluate", launcher=TWO_PROCESSES)
    out = failed.communicate(timeout=600)[0]
    assert failed.returncode != 0
    assert len(re.findall(r"^error: ", out, flags=re.M)) == 1, out
    assert re.search(r"^error: .*test.parquet: no such file", out, flags=re.M), out
    # the first process fails the launch, not the other ended first (which had the launcher stop the first)
    assert "failed (exitcode: 2) local_rank: 0 " in out and "SIGTERM" not in out, out


@pytest.mark.integration
def test_a_process_that_fails_alone_is_named_and_the_others_say_one_line(tmp_path, tiny_decoder):
    """One process of a launch raised a UserError while the other waited at a collective: its one line
    was buried under the other's forty lines of gloo traceback. The waiting one says one line too,
    pointing at the other's, and the launcher names the failed one as the root cause."""
    root = tmp_path / "p"
    _prepare(root, str(tiny_decoder), "train.max_steps=2", "train.batch_size=2")
    launch = _cli(root, "train", launcher=[*TWO_PROCESSES[:-2], str(Path(__file__).parent / "rank_fails.py")])
    out = launch.communicate(timeout=600)[0]
    assert launch.returncode != 0
    assert "error: train: this process cannot read its share of the held-out pairs" in out, out
    assert not re.search(r"^\[rank0\]", out, flags=re.M) and "RuntimeError" not in out, out  # no traceback
    said = re.findall(r"^error: process 0 of the launch stopped at a collective, most often because another process "
                      r"ended first \(its own line says why\); torch said: Connection closed by peer .+\.$", out,
                      flags=re.M)
    assert len(said) <= 1, out  # the launcher may stop it before it says so
    assert "exitcode  : 2 " in out and "rank      : 1 (local_rank: 1)" in out, out

def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, tiny_decoder):
    from rm_lib.errors import TrainingDiverged

    params = tiny_params("train.max_steps=6", "train.save_steps=1", "train.learning_rate=1e30",
                         "train.max_grad_norm=1e30", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    with pytest.raises(TrainingDiverged, match="the loss became"):
        run_steps(params, tmp_path, "train")
    assert list((tmp_path / "models/checkpoints").glob("step-*"))


def test_rerunning_a_finished_run_keeps_its_model_and_metrics(tmp_path, tiny_decoder):
    import math

    params = tiny_params("train.max_steps=3", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    before = weights(tmp_path / "models/reward_model")
    again = run_steps(params, tmp_path, "train")["train"]
    assert again.resumed_from == 3 and math.isfinite(again.final_loss)
    assert math.isfinite(read_json(tmp_path / "data/train/summary.json")["final_loss"])
    assert same_weights(before, weights(tmp_path / "models/reward_model"), 0)
    assert oct((tmp_path / "data/train/summary.json").stat().st_mode & 0o777) == "0o644"


def test_a_benchmark_run_saves_no_last_checkpoint_nor_reward_stats_and_the_pipeline_keeps_both(
        tmp_path, tiny_decoder):
    """bench_train.py's runs are never resumed nor normalised: their device time goes to training and
    the saved model alone. The step's defaults are unchanged."""
    from rm_lib.steps import train

    params = tiny_params("train.max_steps=3", "train.save_steps=100", model=str(tiny_decoder))  # as bench_train's
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    layout = Layout(tmp_path)
    bench = train.run(params, layout, final_checkpoint=False, reward_stats=False)
    assert bench.steps == 3 and bench.wall_s > 0 and bench.tokens_per_s > 0
    assert not list(layout.checkpoints.glob("step-*"))
    assert bench.reward_mean is None and "reward_mean" not in read_json(layout.model / "config.json")
    assert read_json(layout.train_logs / "summary.json")["reward_std"] is None
    again = train.run(params, layout)  # nothing to resume: it trains again, as the pipeline always has
    assert again.resumed_from is None and [p.name for p in layout.checkpoints.glob("step-*")] == ["step-3"]
    assert read_json(layout.model / "config.json")["reward_mean"] == pytest.approx(again.reward_mean)


def test_metrics_log_never_writes_into_a_dvc_cache_link(tmp_path):
    """DVC may leave the persisted metrics.jsonl as a read-only hard link into its cache: a new
    run replaces the file, so the cached object keeps its bytes."""
    import os

    from rm_lib.training.tracking import Tracker

    cached = tmp_path / "cache_object"
    cached.write_text('{"step": 1}\n')
    cached.chmod(0o444)
    metrics = tmp_path / "train" / "metrics.jsonl"
    metrics.parent.mkdir()
    os.link(cached, metrics)
    for resume, expected in ((1, ['{"step": 1}', '{"loss": 0.5, "step": 2}']), (None, ['{"loss": 0.5, "step": 2}'])):
        if metrics.stat().st_nlink == 1:
            metrics.unlink()
            os.link(cached, metrics)
        tracker = Tracker(metrics, project=None, mode="disabled", config={}, run_dir=tmp_path / "wandb")
        tracker.start(resume)  # a resumed run, then a fresh one
        tracker.log({"step": 2, "loss": 0.5})
        assert metrics.stat().st_nlink == 1
        assert cached.read_text() == '{"step": 1}\n'
        assert metrics.read_text().splitlines() == expected


@pytest.mark.parametrize("debias", [False, True], ids=["plain", "length_debias"])
def test_a_token_budget_runs_a_batch_in_pieces_with_the_same_training(tmp_path, tiny_decoder, debias):
    """The same losses and weights in one forward per batch or several (what an out-of-memory retry does
    too), also with the length penalty, whose running values the pieces of a step share."""
    from rm_lib.model.batching import token_chunks

    extra = ["train.length_debias=true", "train.learning_rate=1e-2"] if debias else []
    whole, w_whole, rows = fit_tiny(tmp_path, tiny_decoder, "train.max_tokens_per_forward=null", *extra)
    budget = 2 * max(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in rows)
    assert len(token_chunks(rows[:4], budget)) > 1  # a batch of 4 pairs really runs in pieces
    pieces, w_pieces, _ = fit_tiny(tmp_path, tiny_decoder, f"train.max_tokens_per_forward={budget}", *extra)
    assert [r["loss"] for r in pieces.history] == pytest.approx([r["loss"] for r in whole.history], rel=1e-5)
    assert same_weights(w_whole, w_pieces, atol=1e-5)


def test_activation_checkpointing_recomputes_without_changing_the_training(tmp_path, tiny_decoder, monkeypatch):
    import warnings

    from rm_lib.model import modeling

    loaded, load = [], modeling.load_reward_model
    monkeypatch.setattr(modeling, "load_reward_model", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    plain, w_plain, _ = fit_tiny(tmp_path, tiny_decoder, "train.gradient_checkpointing=false")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated transformers call on this path
        recomputed, w_recomputed, _ = fit_tiny(tmp_path, tiny_decoder, "train.gradient_checkpointing=true")
    assert [m.is_gradient_checkpointing for m in loaded] == [False, True]
    assert [r["loss"] for r in recomputed.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)
    assert same_weights(w_plain, w_recomputed, atol=1e-5)


def test_checkpointing_some_layers_recomputes_those_alone_with_the_same_gradients(tiny_decoder):
    """The device plan checkpoints the first k layers only: those run twice a step, the rest once, and
    the gradients are those of no checkpointing."""
    import torch

    from rm_lib.model.modeling import load_reward_model, unwrap
    from rm_lib.model.packing import pack_pairs_shared, packed_rewards
    from rm_lib.training.model_modes import checkpoint_layers

    from helpers import assert_same_step, gradient_step, shared_prompt_pairs

    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    model.train()
    pairs = shared_prompt_pairs(6, vocab=40)
    step = gradient_step(model, torch.tensor([p["margin"] for p in pairs]))
    compute = lambda: packed_rewards(unwrap(model), pack_pairs_shared(pairs, 0))  # noqa: E731
    layers = list(unwrap(model).model.layers)
    runs = [0] * len(layers)
    for i, layer in enumerate(layers):  # the recompute calls the layer's forward: its parts' hooks see it
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    plain = step(compute)
    assert runs == [1, 1]
    checkpoint_layers(model, 1)
    runs[:] = [0, 0]
    assert_same_step(step(compute), plain)
    assert runs == [2, 1]
    checkpoint_layers(model, None)  # every layer, as train.gradient_checkpointing=true asks
    runs[:] = [0, 0]
    assert_same_step(step(compute), plain)
    assert runs == [2, 2]


def test_the_trainer_plans_a_gpu_run_for_its_largest_batch(tiny_decoder, monkeypatch):
    """On a GPU, the plan sizes memory by the largest batch the training pairs make, not the budget
    per forward: a GPU that could not hold the budget's activations whole holds the batch's."""
    import torch

    from rm_lib.model.modeling import load_reward_model
    from rm_lib.model.packing import largest_batch_tokens
    from rm_lib.settings import load_params
    from rm_lib.training import trainer
    from rm_lib.training.device_plan import GPU_TOKENS_PER_FORWARD, activation_bytes_per_token, model_shape, state_bytes

    from helpers import shared_prompt_pairs

    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    rows = shared_prompt_pairs(40, vocab=40)
    cfg = load_params(None, ["train.batch_size=4"]).train
    largest = largest_batch_tokens(rows, pairs=4, batch_tokens=None, shared_prompt=True)
    shape = model_shape(model)
    # room for the largest batch whole, not for the budget per forward
    free = int((state_bytes(shape) + 2 * largest * activation_bytes_per_token(shape, 0)) / 0.85)
    assert GPU_TOKENS_PER_FORWARD * activation_bytes_per_token(shape, 0) > 0.85 * free - state_bytes(shape)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, free))
    cuda = torch.device("cuda")
    planned = trainer.plan_for(cfg, model, cuda, packed=True, precision="bf16", rows=rows)
    assert not planned.gradient_checkpointing and f"{largest} tokens a forward at most" in planned.why
    assert trainer.plan_for(cfg, model, cuda, packed=True, precision="bf16").gradient_checkpointing  # no rows


def test_a_step_out_of_gpu_memory_runs_again_in_smaller_forwards_with_the_same_training(tmp_path, tiny_decoder,
                                                                                       monkeypatch, capsys):
    """A forward that runs out of GPU memory (the plan's estimate is a model) does not end the run:
    the step starts again, its gradients, the length head's running statistics and the RNGs as before
    it (the failed forwards drew dropout masks), in forwards of half the tokens, and so does the rest
    of the run. The weights are those of a run with that budget from the start."""
    from rm_lib.model import inference
    from rm_lib.model.modeling import load_reward_model, load_tokenizer

    def with_dropout():
        torch.manual_seed(0)
        model = load_reward_model(str(tiny_decoder), pad_token_id=load_tokenizer(str(tiny_decoder)).pad_token_id)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        return model

    real, calls = inference.packed_rewards, []

    def scarce(inner, batch):  # the second forward of the run runs out of memory, once
        calls.append(batch.real_tokens)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(inner, batch)

    settings = ("train.gradient_accumulation_steps=2", "train.length_debias=true", "train.disable_dropout=false")
    monkeypatch.setattr(inference, "packed_rewards", scarce)
    retried, w_retried, rows = fit_tiny(tmp_path, tiny_decoder, *settings, model=with_dropout())
    monkeypatch.setattr(inference, "packed_rewards", real)
    plan = retried.device_plan
    assert plan["out_of_memory_retries"] == 1 and plan["tokens_per_forward"] < 8192
    assert "out of GPU memory at step 1" in capsys.readouterr().out
    steady, w_steady, _ = fit_tiny(tmp_path / "steady", tiny_decoder, *settings,
                                   f"train.max_tokens_per_forward={plan['tokens_per_forward']}", model=with_dropout())
    assert len(calls) > 4  # the step ran again, in more forwards
    assert [r["loss"] for r in retried.history] == pytest.approx([r["loss"] for r in steady.history], rel=1e-5)
    assert same_weights(w_steady, w_retried, atol=1e-6)


def test_out_of_gpu_memory_for_a_single_pair_says_what_to_change():
    from rm_lib.errors import DevicePathError

    rows = [{"input_ids_chosen": [1] * n, "input_ids_rejected": [2] * n} for n in (10, 40, 25)]
    assert trainer._smaller_budget(400, rows, 3) == 200
    assert trainer._smaller_budget(100, rows, 3) == 80  # never below the largest pair, which runs alone
    with pytest.raises(DevicePathError, match=r"step 3 in a forward of a single pair \(80 tokens\).*"
                                              r"train.gradient_checkpointing=true"):
        trainer._smaller_budget(80, rows, 3)


def test_out_of_gpu_memory_outside_a_forward_names_what_needs_the_room(tmp_path, tiny_decoder, monkeypatch):
    from rm_lib.errors import DevicePathError

    def no_room(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.50 GiB (a stand-in)")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_room)
    with pytest.raises(DevicePathError, match=r"outside the training forwards \(CUDA out of memory. Tried to "
                                              r"allocate 7.50 GiB.*AdamW's state.*train.lora=true"):
        fit_tiny(tmp_path, tiny_decoder)


def test_token_chunks_keep_order_and_budget():
    from rm_lib.model.batching import token_chunks

    rows = [{"input_ids_chosen": [1] * n, "input_ids_rejected": [2] * n} for n in (3, 3, 10, 1, 1, 2)]
    chunks = token_chunks(rows, 8)
    assert [len(c) for c in chunks] == [1, 1, 1, 3]  # 6, 6, 20 (alone, over the budget), 2 + 2 + 4
    assert [r for c in chunks for r in c] == rows
    assert token_chunks(rows, None) == [rows]


def _pairs_of(lengths: list[int]) -> list[dict]:
    return [{"input_ids_chosen": [1] * n, "input_ids_rejected": [2] * n} for n in lengths]


def test_token_budgeted_batches_hold_many_short_pairs_and_few_long_ones():
    from rm_lib.model.batching import epoch_batches, pair_tokens

    rows = _pairs_of([3] * 40 + [60] * 10)  # pairs of 6 and of 120 tokens
    batches = epoch_batches(rows, 4, seed=0, epoch=0, group_by_length=True, batch_tokens=240)
    assert sorted(i for b in batches for i in b) == list(range(50))  # every pair once
    assert all(sum(pair_tokens(rows[i]) for i in b) <= 240 for b in batches)
    short = max(len(b) for b in batches if b[0] < 40)
    long = max(len(b) for b in batches if b[0] >= 40)
    assert (short, long) == (40, 2)
    assert batches == epoch_batches(rows, 4, seed=0, epoch=0, group_by_length=True, batch_tokens=240)
    assert batches != epoch_batches(rows, 4, seed=0, epoch=1, group_by_length=True, batch_tokens=240)


def test_the_epoch_schedule_finds_every_micro_batch_across_epochs():
    from rm_lib.model.batching import EpochSchedule

    rows = _pairs_of([1 + i % 13 for i in range(90)])
    schedule = EpochSchedule(rows, 4, seed=3, group_by_length=False, batch_tokens=40)  # counts vary by epoch
    counts = [schedule.count(e) for e in range(4)]
    assert len(set(counts)) > 1
    micro = 0
    for epoch, count in enumerate(counts):
        for position in range(count):
            assert schedule.locate(micro) == (epoch, position)
            micro += 1
    assert schedule.micro_batches(2) == counts[0] + counts[1]
    assert schedule.micro_batches(1.5) == counts[0] + int(0.5 * counts[1])
    accumulated = EpochSchedule(rows, 4, seed=3, group_by_length=True, accumulation=3)
    assert accumulated.count(0) == 24  # 8 steps of 12 pairs, each in 3 micro-batches
    assert accumulated.micro_batches(1.5) == 24 + 4 * 3  # half an epoch: 4 whole steps
    assert accumulated.micro_batches(0.1) == 0  # less than a step (train takes one)
    by_pairs = EpochSchedule(rows, 4, seed=3, group_by_length=True)
    assert by_pairs.count(0) == by_pairs.count(5) == 23 and len(by_pairs.batches(5)) == 23


def test_training_with_token_budgeted_batches_runs_one_epoch_of_them(tmp_path, tiny_decoder):
    from rm_lib.model.batching import epoch_batches

    result, _, rows = fit_tiny(tmp_path, tiny_decoder, "train.max_steps=null", "train.num_epochs=1",
                               "train.batch_tokens=800", "train.logging_steps=1")
    expected = epoch_batches(rows, 4, seed=42, epoch=0, group_by_length=True, batch_tokens=800)
    assert result.steps == len(expected) < len(rows) // 4  # fewer, larger steps than 4 pairs each
    # the epochs trained when each step is logged, that step included: one whole epoch at the end
    assert [r["epoch"] for r in result.history] == pytest.approx([(k + 1) / len(expected)
                                                                 for k in range(len(expected))], abs=1e-4)


def test_accumulated_steps_train_as_one_batch_that_many_times_larger(tmp_path, tiny_decoder):
    """gradient_accumulation_steps=k with batch_size=b takes, step by step, the pairs of batch_size=k*b,
    length grouping on (the default): the same losses and weights, also over a fraction of an epoch (it
    was counted in micro-batches: one step more, part-filled with the longest pairs, and another
    learning-rate schedule). An epoch that k*b pairs do not divide has one smaller step, each pair
    counting once and the step's gradient the mean over its own pairs."""
    from rm_lib.model.batching import EpochSchedule, step_forwards

    for epochs in ("1", "1.5"):
        epoch = ("train.max_steps=null", f"train.num_epochs={epochs}", "train.logging_steps=1")
        accumulated, w_accumulated, rows = fit_tiny(tmp_path, tiny_decoder, *epoch,
                                                    "train.gradient_accumulation_steps=5")
        larger, w_larger, _ = fit_tiny(tmp_path, tiny_decoder, *epoch, "train.batch_size=20")
        steps = -(-len(rows) // 20)  # in an epoch
        assert len(rows) % 20 and accumulated.steps == larger.steps == steps + int((float(epochs) - 1) * steps)
        assert [r["loss"] for r in accumulated.history] == pytest.approx([r["loss"] for r in larger.history],
                                                                         rel=1e-5)
        assert same_weights(w_accumulated, w_larger)
    schedule = EpochSchedule(rows, 4, seed=42, group_by_length=True, accumulation=5)
    batches = schedule.count(0)
    laid_out = [step_forwards(rows, schedule, step * 5, 5, 0, 1, None, end=batches) for step in range(steps)]
    trained = [[p["id"] for forwards in step for f in forwards for p in f.pairs] for step in laid_out]
    assert sorted(i for ids in trained for i in ids) == sorted(r["id"] for r in rows)
    assert sorted(map(len, trained))[0] == len(rows) % 20  # the smaller step, wherever the shuffle put it
    for step in laid_out:
        assert sum(f.weight for forwards in step for f in forwards) == pytest.approx(1)  # a mean over its pairs


def test_the_logged_padding_fraction_is_over_every_process(tmp_path, tiny_decoder, monkeypatch):
    """The loss and accuracy of a log are sums over the processes; the padding fraction was the first
    process's alone. Here the logging reduction is given a second process that computed nothing and padded
    as much as this one: the fraction logged is over both."""
    from accelerate import Accelerator

    steps = ("train.logging_steps=1", "train.padding_free=false")
    alone, _, _ = fit_tiny(tmp_path, tiny_decoder, *steps)
    reduce = Accelerator.reduce

    def with_a_second_process(self, tensor, reduction="sum"):
        if tensor.numel() == 8:  # the log's sums (trainer.WINDOW_SUMS, WINDOW_COUNTS)
            other = torch.zeros_like(tensor)
            other[7] = tensor[7]  # padded as much, computed nothing
            return tensor + other
        return reduce(self, tensor, reduction)

    monkeypatch.setattr(Accelerator, "reduce", with_a_second_process)
    shutil.rmtree(tmp_path / "checkpoints")  # trained anew, not taken from the first run's last checkpoint
    both, _, _ = fit_tiny(tmp_path, tiny_decoder, *steps)
    fractions = [(r["padding_fraction"], s["padding_fraction"]) for r, s in zip(alone.history, both.history)]
    assert fractions and all(0 < one < 1 for one, _ in fractions)
    assert [two for _, two in fractions] == pytest.approx([(1 + one) / 2 for one, _ in fractions])
    assert [r["loss"] for r in both.history] == [r["loss"] for r in alone.history]


def test_a_loss_that_diverged_on_one_process_stops_every_process_at_its_step():
    """Each process saw only its own loss: one whose loss stayed finite went on to the next collective while
    the other stopped. The first bad step of any process, and its loss, are every process's (gathered)."""
    from rm_lib.training.trainer import _first_bad

    class TwoProcesses:  # this process saw nothing; the other, a nan at step 3 (an inf at step 5 later)
        num_processes = 2

        def gather(self, pair):
            return torch.cat([pair, torch.tensor([3.0, float("nan")], dtype=pair.dtype)])

    step, loss = _first_bad(TwoProcesses(), torch.tensor(0), torch.tensor(0.0))
    assert step == 3 and math.isnan(loss)
    mine = _first_bad(TwoProcesses(), torch.tensor(5), torch.tensor(float("inf")))
    assert mine[0] == 3  # the earlier of the two
    alone = types.SimpleNamespace(num_processes=1)
    assert _first_bad(alone, torch.tensor(0), torch.tensor(0.0)) == (0, 0.0)
    assert _first_bad(alone, torch.tensor(2), torch.tensor(float("inf"))) == (2, float("inf"))


def test_accumulation_takes_the_pairs_of_a_larger_batch_in_each_step_of_every_epoch():
    """By pairs (k x batch_size) and by tokens (k x batch_tokens), length-grouped or not: a step's
    micro-batches hold the pairs of one larger batch, an epoch holds whole steps, and a micro-batch
    never holds more than batch_size pairs."""
    import random

    from rm_lib.model.batching import EpochSchedule

    rng = random.Random(0)
    rows = _pairs_of([rng.randint(1, 40) for _ in range(61)])
    for k in (2, 3, 7):
        for grouped in (True, False):
            cases = [(EpochSchedule(rows, 4, seed=1, group_by_length=grouped, accumulation=k),
                      EpochSchedule(rows, 4 * k, seed=1, group_by_length=grouped)),
                     (EpochSchedule(rows, 4, seed=1, group_by_length=grouped, batch_tokens=90, accumulation=k),
                      EpochSchedule(rows, 4, seed=1, group_by_length=grouped, batch_tokens=90 * k))]
            for by_pairs, (accumulated, larger) in zip((True, False), cases):
                for epoch in (0, 1):
                    micro = accumulated.batches(epoch)
                    assert len(micro) % k == 0
                    steps = [sorted(i for batch in micro[s:s + k] for i in batch) for s in range(0, len(micro), k)]
                    assert steps == [sorted(batch) for batch in larger.batches(epoch)]
                    assert not by_pairs or max(map(len, micro)) == 4


def test_a_run_resumed_between_logs_logs_what_an_uninterrupted_run_logs(tmp_path, tiny_decoder):
    """A checkpoint between two logs (save_steps not a multiple of logging_steps) keeps the logging window
    so far: the resumed run's next log covers the same steps as the uninterrupted run's, and the final
    loss and accuracy, which the release gate and the card quote, are the same."""
    run = ("train.max_steps=6", "train.save_steps=2", "train.logging_steps=3", "train.eval_steps=5")
    whole, _, _ = fit_tiny(tmp_path / "whole", tiny_decoder, *run)

    def stop(model, step):
        raise KeyboardInterrupt  # at step 5, before its checkpoint: the run resumes from step 4

    with pytest.raises(KeyboardInterrupt):
        fit_tiny(tmp_path / "resumed", tiny_decoder, *run, on_eval=stop)
    resumed, _, _ = fit_tiny(tmp_path / "resumed", tiny_decoder, *run)
    assert resumed.resumed_from == 4
    assert [r["step"] for r in resumed.history] == [6]
    for key in ("loss", "accuracy", "reward_margin"):
        assert resumed.history[-1][key] == pytest.approx(whole.history[-1][key], rel=1e-5), key


def test_retention_keeps_the_newest_checkpoints_and_the_best(tmp_path, tiny_decoder):
    accuracies = iter([0.5, 0.9, 0.6, 0.7, 0.8, 0.6, 0.7, 0.8])
    result, _, _ = fit_tiny(tmp_path, tiny_decoder, "train.max_steps=8", "train.save_steps=1",
                             "train.save_total_limit=2", "train.eval_steps=1",
                             on_eval=lambda model, step: {"accuracy": next(accuracies)})
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-2", "step-7", "step-8"]
    assert (result.best_step, result.best_eval_accuracy) == (2, 0.9)
    state = json.loads((tmp_path / "checkpoints/step-8/trainer_state.json").read_text())
    assert state["best_step"] == 2


def test_the_step_loop_reads_nothing_back_from_the_device_between_logs(tmp_path, tiny_decoder, monkeypatch):
    """A read of a device tensor (.item(), float(), bool(), .tolist()) waits for the GPU to finish:
    the loop may read at logging, evaluation and saving, never per step or per forward. (AdamW's own
    step counter is read on a CPU, where it lives; fused AdamW on a GPU keeps it on the device.)"""
    import sys

    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += "/rm_lib/" in sys._getframe(1).f_code.co_filename  # the project's reads
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for steps in (2, 8):
        reads["n"] = 0
        fit_tiny(tmp_path, tiny_decoder, f"train.max_steps={steps}", "train.logging_steps=100",
                 "train.save_steps=100", "train.max_tokens_per_forward=64")  # several forwards per step
        counts[steps] = reads["n"]
    assert counts[2] == counts[8] > 0  # the last step's log and save alone



def test_evaluation_during_training_uses_the_models_own_attention_and_a_failed_run_restores_it(
        tmp_path, tiny_decoder, monkeypatch):
    """The run may train with other attention than the model's (flex_attention on a GPU, fp32 SDPA
    under bf16 on a CPU; here eager, as set). Evaluation during training scores as the saved model will
    (flex_attention on padded batches would compile for each batch shape), and a run that raises
    leaves the model with its own attention, as one that ends does."""
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, unwrap
    from rm_lib.training import trainer

    seen = {"train": set(), "eval": []}
    real_forward = trainer.PairScorer.forward

    def forward(self, batch, lengths=None):
        if self.training:
            seen["train"].add(unwrap(self).config._attn_implementation)
        return real_forward(self, batch, lengths)

    def on_eval(model, step):
        seen["eval"].append(unwrap(model).config._attn_implementation)
        if step == 2:
            raise RuntimeError("evaluation failed")
        return {"accuracy": 0.5}

    model = load_reward_model(str(tiny_decoder), pad_token_id=load_tokenizer(str(tiny_decoder)).pad_token_id)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(trainer.PairScorer, "forward", forward)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        fit_tiny(tmp_path, tiny_decoder, "train.attention=eager", "train.eval_steps=1", "train.max_steps=4",
                 on_eval=on_eval, model=model)
    assert seen == {"train": {"eager"}, "eval": ["sdpa", "sdpa"]}
    assert model.config._attn_implementation == "sdpa"


def test_compiled_layers_train_the_same_weights_with_one_graph_and_leave_the_model_plain(
        tmp_path, tiny_decoder, monkeypatch, aot_eager_compiles):
    """train.compile: each transformer layer compiled for the run. Compiled here by dynamo with the
    aot_eager backend (the graphs, without inductor's code generation on a 2-core CPU): the same weights
    as without, one graph for both layers and every row width, evaluation during training uncompiled
    (as the saved model is scored), and the model plain after the run."""
    from torch._dynamo.utils import counters

    from rm_lib.model.inference import score_pairs
    from rm_lib.model.modeling import load_reward_model, load_tokenizer

    torch._dynamo.reset()
    _, plain, rows = fit_tiny(tmp_path / "plain", tiny_decoder, "train.max_steps=3")
    pad = load_tokenizer(str(tiny_decoder)).pad_token_id
    torch.manual_seed(0)  # the new score head as fit_tiny draws it
    model = load_reward_model(str(tiny_decoder), pad_token_id=pad)
    before = counters["stats"]["unique_graphs"]
    widths = set()

    def on_eval(prepared, step):
        score_pairs(prepared, rows[:6], pad_token_id=pad, batch_size=3)
        return {"accuracy": 0.5}

    real_pack = trainer.pack_pairs_shared

    def pack(*args, **kwargs):
        batch = real_pack(*args, **kwargs)
        widths.add(batch.input_ids.shape[1])
        return batch

    monkeypatch.setattr(trainer, "pack_pairs_shared", pack)
    _, compiled, _ = fit_tiny(tmp_path / "compiled", tiny_decoder, "train.max_steps=3", "train.compile=true",
                              "train.eval_steps=1", on_eval=on_eval, model=model)
    assert len(widths) > 1 and counters["stats"]["unique_graphs"] - before == 1
    for name, weight in plain.items():
        torch.testing.assert_close(compiled[name], weight, rtol=1e-4, atol=1e-6)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())


@pytest.fixture
def accelerate_afresh():
    """accelerate's per-process state as a new process has it, after the test (the test changes it)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_runs_in_one_process_may_train_in_different_precisions(tmp_path, tiny_decoder, capsys, accelerate_afresh):
    """A notebook or Dagster's in-process executor trains twice in one process: accelerate would
    refuse the second run's other mixed precision ("AcceleratorState has already been initialized")."""
    said = []
    for precision in ("no", "bf16", "no"):
        params = tiny_params(f"train.mixed_precision={precision}", "train.max_steps=2", model=str(tiny_decoder))
        run_steps(params, tmp_path / f"{precision}-{len(said)}", "download", "tokenize", "filter", "train")
        said.append("train: attention rm_sdpa_fp32" in capsys.readouterr().out)
    assert said == [False, True, False]  # fp32 SDPA is the plan under bf16 autocast alone


@pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 trains on a GPU; the refusal is a CPU's")
def test_fp16_on_a_cpu_is_refused_before_training_instead_of_training_fp32_recorded_as_fp16(tmp_path, tiny_decoder,
                                                                                           accelerate_afresh):
    """accelerate runs fp16 on a CPU as plain fp32 without a word: the model was bit-identical to
    mixed_precision=no while run.json, summary.json and the card said fp16."""
    from rm_lib.errors import SettingsError
    from rm_lib.pipeline.preflight import check_before
    from rm_lib.steps import PIPELINE

    params = tiny_params("train.mixed_precision=fp16", "train.max_steps=2", model=str(tiny_decoder))
    # `run` (the CLI, and a Dagster run's first step) refuses it before download replaces anything
    with pytest.raises(SettingsError, match=r"^train.mixed_precision: fp16 needs a GPU.*Use 'bf16' .* or 'no'$"):
        check_before(PIPELINE, params)
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    with pytest.raises(SettingsError, match=r"^train.mixed_precision: fp16 needs a GPU"):
        run_steps(params, tmp_path, "train")
    assert not Layout(tmp_path).model.exists() and not Layout(tmp_path).checkpoints.exists()


def test_bf16_training_on_a_cpu_runs_attention_in_fp32_and_saves_the_model_as_loaded(tmp_path, tiny_decoder):
    """bf16 autocast on a CPU: the matrix products in bf16, SDPA on fp32 inputs (its bf16 backward is
    5x slower; tests/test_packing.py checks the inputs it gets), evaluation during training (in the
    model's own attention); the saved model loads with the attention it was given. Through the CLI,
    as a user runs it."""
    from rm_lib.model.modeling import load_reward_model

    _prepare(tmp_path, str(tiny_decoder), "train.mixed_precision=bf16", "train.max_steps=2", "train.eval_steps=1")
    run = _cli(tmp_path, "train")
    assert run.wait() == 0, run.stdout.read()
    assert "train: attention rm_sdpa_fp32" in run.stdout.read()
    evals = [r for r in read_jsonl(tmp_path / "data/train/metrics.jsonl") if "eval_accuracy" in r]
    assert len(evals) == 2
    assert load_reward_model(str(Layout(tmp_path).model)).config._attn_implementation == "sdpa"


def test_a_bf16_checkpoint_trains_fp32_weights_so_small_updates_are_kept(tmp_path, tiny_decoder, monkeypatch):
    """transformers loads a bf16 checkpoint (most Hub LLMs) as bf16; AdamW's small updates to bf16 weights
    round to nothing. Training gets fp32 weights, with or without mixed precision, and saves them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rm_lib.steps import train as train_step

    bf16 = tmp_path / "bf16-model"
    AutoModelForCausalLM.from_pretrained(tiny_decoder, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_decoder).save_pretrained(bf16)
    assert {t.dtype for t in weights(bf16).values()} == {torch.bfloat16}
    seen, real_fit = [], train_step.fit

    def spy(cfg, model, *args, **kwargs):
        seen.append({p.dtype for p in model.parameters()})
        return real_fit(cfg, model, *args, **kwargs)

    monkeypatch.setattr(train_step, "fit", spy)
    run_steps(tiny_params("train.mixed_precision=no", "train.max_steps=2", model=str(bf16)), tmp_path / "run",
              "download", "tokenize", "filter", "train")
    assert seen == [{torch.float32}]
    assert {t.dtype for t in weights(Layout(tmp_path / "run").model).values()} == {torch.float32}
    # LoRA: the frozen base keeps the checkpoint's dtype (half the memory), the adapters train in fp32
    run_steps(tiny_params("train.mixed_precision=no", "train.max_steps=1", "train.lora=true", model=str(bf16)),
              tmp_path / "lora", "download", "tokenize", "filter", "train")
    assert torch.bfloat16 in seen[1] and torch.float32 in seen[1]
    # ... and the model is merged and saved in fp32, with the normalisation stats of that model
    lora = Layout(tmp_path / "lora")
    assert {t.dtype for t in weights(lora.model).values()} == {torch.float32}
    from rm_lib.data.tokenstore import read_rows
    from rm_lib.evaluation.metrics import pair_metrics
    from rm_lib.model.inference import score_pairs
    from rm_lib.model.modeling import load_reward_model

    sample = read_rows(lora.filtered / "train.parquet")[:train_step.NORMALISATION_SAMPLE]
    saved = load_reward_model(str(lora.model), trained=True)
    r_c, r_r = score_pairs(saved, sample, pad_token_id=saved.config.pad_token_id)
    stats = pair_metrics(r_c, r_r, [1] * len(sample), [1] * len(sample), buckets=1)
    config = read_json(lora.model / "config.json")
    # the stats are the trained adapters' on the base: the merged fp32 model gives them to the rounding of
    # the bf16 base's forward (a few 1e-4 on these rewards, as the pairs sampled go)
    assert config["reward_mean"] == pytest.approx(stats["reward_mean"], abs=1e-3)
    assert config["reward_std"] == pytest.approx(stats["reward_std"], abs=1e-3)


FSDP_RUN = ("download.demo_pairs=50", "download.test_fraction=0.1", "train.max_steps=null", "train.save_steps=4",
            "train.length_debias=true", "train.length_debias_weight=1", "train.max_tokens_per_forward=160")


@pytest.mark.integration
@pytest.mark.parametrize("launch", ["ddp", "fsdp", "fsdp-lora"])
def test_two_processes_train_as_one_through_uneven_shares_and_save_the_whole_model(tmp_path, tiny_decoder, launch,
                                                                                      one_process):
    """FSDP2 as configs/accelerate/fsdp.yaml sets it, on two CPU processes (tests/fsdp_cpu.py), against
    one process at the same global batch: the same losses and the same saved weights. On the way: a
    forward budget under which the two shares of a batch split into different numbers of forwards
    (each gathers weights: the processes must run as many), a last batch of one pair, which leaves
    one process none, and the length head's one-element weight, sharded with the model, and its running
    reward statistics, which the penalty reads: those of the step's pairs on both processes. With
    LoRA, the saved folder is the one a single process saves: the merged model and the adapter. Under
    FSDP the second process plans half the first's forward budget (a GPU with less free memory): both run
    with the smaller (each laid out the step by its own, and they waited for each other for good)."""
    from rm_lib.data.tokenstore import read_rows
    from rm_lib.model.batching import EpochSchedule, process_slice, token_chunks

    sharded = launch != "ddp"
    settings = (*FSDP_RUN, *(("train.lora=true", "train.learning_rate=1e-3") if launch == "fsdp-lora" else ()))
    one_root = one_process(*settings, "train.batch_size=4")
    _prepare(tmp_path / "two", str(tiny_decoder), *settings, "train.batch_size=2")
    rows = read_rows(tmp_path / "two/data/filtered/train.parquet")
    assert len(rows) % 4 == 1  # the epoch's last batch: one pair, for one of the two processes
    batches = EpochSchedule(rows, 4, seed=42, group_by_length=True).batches(0)
    counts = [[len(token_chunks([rows[i] for i in process_slice(b, r, 2)], 160)) for r in range(2)] for b in batches]
    assert any(a != b for a, b in counts) and min(map(len, batches)) == 1
    harness = "rank_budget.py" if launch == "fsdp" else "fsdp_cpu.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(Path(__file__).parent / harness)] if sharded else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rm_lib"]
    if launch == "ddp":  # a process given another number of epochs: all stop at once, none waits for the others
        odd = _cli(tmp_path / "two", "train", launcher=[*launcher[:-2], str(Path(__file__).parent / "rank_override.py"),
                                                        "train.num_epochs=2"])
        try:
            out = odd.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            odd.terminate()  # the launcher stops its processes (each in a session of its own) before it ends
            pytest.fail("the processes waited for each other: " + odd.communicate(timeout=120)[0][-3000:])
        said = ("error: train: the processes of this launch were not given the same run: against rank 0, rank 1 in "
                "train.num_epochs (1.0 against 2.0).")
        assert odd.returncode != 0 and out.count(said) == 1, out  # once, not by each process
        # a loss that diverges: every process stops at the same step, and one line says so
        nan = _cli(tmp_path / "two", "train", "--set", "train.learning_rate=1e30", launcher=launcher)
        out = nan.communicate(timeout=300)[0]
        assert nan.returncode != 0 and len(re.findall(r"error: train: the loss became \S+ at step", out)) == 1, out
    two = _cli(tmp_path / "two", "train", launcher=launcher)
    try:
        out = two.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        two.terminate()
        pytest.fail("the processes waited for each other: " + two.communicate(timeout=120)[0][-3000:])
    assert two.returncode == 0, out
    if launch != "fsdp-lora":
        _one_process_refuses_to_resume(tmp_path / "two", "2 processes (FSDP)" if sharded else "2 processes (DDP)")
    two_root = tmp_path / "two"
    loss_one, _, stats_one = _records(one_root)
    loss_two, _, stats_two = _records(two_root)
    assert len(loss_one) == len(batches) and loss_two == pytest.approx(loss_one, rel=1e-4, abs=1e-5)
    logged = [[r[k] for r in read_jsonl(run / "data/train/metrics.jsonl") if "loss" in r
               for k in ("accuracy", "reward_margin")] for run in (one_root, two_root)]
    assert logged[1] == pytest.approx(logged[0], rel=1e-4, abs=1e-5)  # over both processes' pairs, not the first's
    assert stats_two[:2] == pytest.approx(stats_one[:2], rel=1e-4, abs=1e-5) and stats_two[2] == 2
    assert same_weights(weights(two_root / "models/reward_model"), weights(one_root / "models/reward_model"), atol=1e-4)
    agreed = 80 if launch == "fsdp" else 160
    summary = read_json(tmp_path / "two/data/train/summary.json")
    assert summary["device_plan"]["tokens_per_forward"] == agreed
    # what the model card names as the launch that trains it again (`dvc repro` trains in one process)
    assert summary["launch"] == ("2 processes (FSDP)" if sharded else "2 processes (DDP)")
    launched = "--config_file configs/accelerate/fsdp.yaml" if sharded else "--multi_gpu"
    assert summary["launch_command"] == f"accelerate launch {launched} --num_processes 2 -m rm_lib run"
    if launch == "fsdp-lora":
        _saved_as_one_process_saves_it(one_root / "models/reward_model", two_root / "models/reward_model", rows[:4],
                                       tiny_decoder)


def _one_process_refuses_to_resume(root: Path, saved_by: str) -> None:
    """`train` without the launcher over the checkpoints of a run with two: refused, the checkpoints kept."""
    checkpoints = root / "models/checkpoints"
    states = {p.name: p.read_text() for p in checkpoints.glob("step-*/trainer_state.json")}
    one = _cli(root, "train")
    out = one.communicate(timeout=120)[0]
    assert one.returncode == 2, out
    error = next(line for line in out.splitlines() if line.startswith("error: "))
    assert f"of this run was saved by {saved_by}; this launch is 1 process and cannot resume it" in error, out
    assert "To resume, relaunch as it was saved" in error and error.endswith(f"remove {checkpoints}")
    assert {p.name: p.read_text() for p in checkpoints.glob("step-*/trainer_state.json")} == states
    assert states and all(json.loads(s)["processes"] == 2 for s in states.values())


def _saved_as_one_process_saves_it(one: Path, two: Path, rows: list[dict], base: Path) -> None:
    """A LoRA run's folder: the merged model (config with the reward statistics) that transformers loads
    alone, giving the rewards of the one-process run's, and the adapter beside it."""
    from transformers import AutoModelForSequenceClassification

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    assert files(two) == files(one) and "adapter/adapter_model.safetensors" in files(two)
    stats = ("reward_mean", "reward_std", "mean", "std")  # the last two: OpenRLHF's names for them
    configs = [{k: v for k, v in read_json(folder / "config.json").items() if k != "rm_lib_fingerprint"}
               for folder in (one, two)]
    assert [configs[1].pop(k) for k in stats] == pytest.approx([configs[0].pop(k) for k in stats], rel=1e-4)
    assert configs[1] == configs[0]
    assert same_weights(load_file(two / "adapter/adapter_model.safetensors"),
                        load_file(one / "adapter/adapter_model.safetensors"), atol=1e-4)
    merged, untrained = weights(two), weights(base)
    assert any(not torch.allclose(merged[k], untrained[k].float(), atol=1e-4) for k in untrained
               if k in merged and merged[k].shape == untrained[k].shape)
    rewards = []
    for folder in (one, two):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            rewards.append([model(torch.tensor([r["input_ids_chosen"]])).logits.item() for r in rows])
    assert rewards[1] == pytest.approx(rewards[0], abs=1e-4)


@pytest.mark.parametrize("world, accumulation, budget",
                         [(1, 2, None), (2, 1, None), (2, 2, 40), (3, 2, 25), (4, 1, 30)])
def test_each_pair_counts_once_and_alike_in_a_steps_gradient_on_every_process(world, accumulation, budget):
    """However a step's pairs fall to micro-batches, processes and forwards (batches of different sizes
    by tokens, an epoch's last batch of one pair), each counts 1/(the step's pairs) in the gradient
    the processes average, and every process runs as many forwards as the others, in each
    micro-batch: a process without pairs left runs one at weight 0."""
    import random

    from rm_lib.model.batching import EpochSchedule, step_forwards

    rng = random.Random(world * 10 + accumulation)
    rows = [{"id": i, "input_ids_chosen": [1] * rng.randint(1, 30), "input_ids_rejected": [2] * rng.randint(1, 30)}
            for i in range(23)]
    rows += [{"id": 23 + i, "input_ids_chosen": [1] * 150, "input_ids_rejected": [2] * 150} for i in range(2)]
    # batches by tokens: a pair longer than the budget is a batch alone, with fewer pairs than processes
    schedule = EpochSchedule(rows, 4 * world, seed=1, group_by_length=False, batch_tokens=50 * world,
                             accumulation=accumulation)
    steps = schedule.micro_batches(1) // accumulation
    assert any(0 < len(b) < world for b in schedule.batches(0)) or world == 1
    for step in range(steps):
        layouts = [step_forwards(rows, schedule, step * accumulation, accumulation, r, world, budget)
                   for r in range(world)]
        step_pairs = [rows[i]["id"] for k in range(accumulation)
                      for i in schedule.batches(0)[step * accumulation + k]]
        counted = [(p["id"], f.weight / len(f.pairs) / world) for layout in layouts for forwards in layout
                   for f in forwards if f.counts for p in f.pairs]
        assert sorted(i for i, _ in counted) == sorted(step_pairs)
        assert all(w == pytest.approx(1 / len(step_pairs)) for _, w in counted)
        assert len({len(layout) for layout in layouts}) == 1  # empty micro-batches (a smaller step) left out
        for k in range(len(layouts[0])):
            assert len({len(layout[k]) for layout in layouts}) == 1
            spare = [f for layout in layouts for f in layout[k] if not f.counts]
            assert all(f.weight == 0 and len(f.pairs) == 1 for f in spare)
        if budget is not None:
            assert all(sum(len(p["input_ids_chosen"]) + len(p["input_ids_rejected"]) for p in f.pairs) <= budget
                       or len(f.pairs) == 1 for layout in layouts for forwards in layout for f in forwards)


def test_deepspeed_is_refused_with_what_to_use_instead():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rm_lib.errors import SettingsError

    with pytest.raises(SettingsError, match=r"DeepSpeed is not supported; launch with configs/accelerate/fsdp.yaml"):
        distributed.check_distributed(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    for kind in ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP"):
        distributed.check_distributed(SimpleNamespace(distributed_type=getattr(DistributedType, kind)))
    assert (Path(__file__).parents[1] / "configs/accelerate/fsdp.yaml").exists()


def test_a_checkpoint_resumes_only_with_as_many_processes_as_saved_it():
    """Each process takes train.batch_size pairs of a step: another number of processes is another
    global batch, and another position in the data at the same step."""
    params = tiny_params()
    one, two = (trainer.run_fingerprint(params.train, params.model, "data", "code", n) for n in (1, 2))
    assert one != two and one == trainer.run_fingerprint(params.train, params.model, "data", "code")
    # FSDP's checkpoints are laid out as DDP's are not: another run, whose checkpoints record their launch
    assert trainer.run_fingerprint(params.train, params.model, "data", "code", 2, fsdp=True) not in (one, two)
    assert (str(distributed.Launch()), str(distributed.Launch(2)), str(distributed.Launch(4, fsdp=True))) == \
        ("1 process", "2 processes (DDP)", "4 processes (FSDP)")


def test_processes_given_different_runs_all_stop_naming_the_odd_ones_and_what_differs(monkeypatch):
    """Each process reads its own params.yaml, overrides and data: one that differs would train its share of
    another model into the common weights, or wait at a collective the others never reach."""
    from types import SimpleNamespace

    import accelerate.utils

    from rm_lib.errors import SettingsError

    run = {"train": {"learning_rate": 5e-5, "num_epochs": 1}, "filtered data": "a1", "training code": "c"}
    runs = [run, {**run, "train": {"learning_rate": 1e-4, "num_epochs": 1}}, run, {**run, "filtered data": "b2"}]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: runs)
    with pytest.raises(SettingsError) as caught:
        distributed.check_same_run(SimpleNamespace(num_processes=4), run)
    message = str(caught.value)
    assert message.startswith("train: the processes of this launch were not given the same run: against rank 0, "
                              "rank 1 in train.learning_rate (5e-05 against 0.0001); rank 3 in filtered data "
                              "('a1' against 'b2'). Every process must read the same params.yaml")
    assert "\n" not in message
    runs[:] = [runs[1], run, run, run]  # the odd one out is the first process: judged against the others
    odd_first = r"against rank 1, rank 0 in train.learning_rate \(5e-05 against 0.0001\)\. Every"
    with pytest.raises(SettingsError, match=odd_first):
        distributed.check_same_run(SimpleNamespace(num_processes=4), run)
    runs[:] = [run, run]
    distributed.check_same_run(SimpleNamespace(num_processes=2), run)


def test_a_wandb_mode_wandb_refuses_stops_before_the_model_loads(tmp_path, tiny_decoder, monkeypatch):
    from unittest import mock

    from rm_lib.errors import SettingsError
    from rm_lib.steps import train as train_step

    params = tiny_params("train.wandb_project=p", "train.wandb_mode=auto", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    monkeypatch.setenv("WANDB_MODE", "off")
    with mock.patch.object(train_step, "load_reward_model", side_effect=AssertionError("the model loaded")):
        with pytest.raises(SettingsError, match="WANDB_MODE is 'off'.*online, offline, disabled"):
            run_steps(params, tmp_path, "train")


def test_wandb_run_files_outlive_a_queued_dvc_experiment(tmp_path, monkeypatch):
    """`dvc exp run --queue` trains in a copy under .dvc/tmp/exps that DVC deletes afterwards: an offline
    W&B run kept there could never be synced."""
    from rm_lib.training.tracking import wandb_dir

    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert wandb_dir(tmp_path) == tmp_path  # W&B makes its wandb/ there
    assert wandb_dir(tmp_path / ".dvc/tmp/exps/tmp1a2b") == tmp_path.resolve()
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert wandb_dir(tmp_path / ".dvc/tmp/exps/tmp1a2b") == tmp_path / "elsewhere"


def test_a_check_one_process_fails_stops_every_process(monkeypatch):
    """Checkpoints may lie on each machine's own disk: a launch refused on one machine alone would leave the
    others waiting for it at their first collective until the process group's timeout."""
    from types import SimpleNamespace

    import accelerate.utils

    from rm_lib.errors import SettingsError

    said_elsewhere = "train: the checkpoint models/checkpoints/step-8 of this run was saved by 2 processes"
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [*mine, said_elsewhere])
    with pytest.raises(SettingsError, match="saved by 2 processes"):
        distributed.agreed(SimpleNamespace(num_processes=2), lambda: None)  # this process's own check passed
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [*mine, None])
    distributed.agreed(SimpleNamespace(num_processes=2), lambda: None)


def test_training_progress_off_a_terminal_is_a_line_now_and_then(monkeypatch, capsys):
    """Off a terminal (a log file, CI, Dagster's captured stderr) tqdm's redraws joined into lines of
    thousands of characters: a line every 30 s instead, with the last logged figures; none on the other
    processes, none for the last step (the summary follows)."""
    from rm_lib.training import progress

    clock = iter(range(0, 10_000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.StepProgress(total=6, initial=0, show=True)
    for step in range(1, 7):
        bar.update()
        if step == 2:
            bar.set_postfix(loss="0.6931", acc="0.500")
    bar.close()
    assert capsys.readouterr().err.splitlines() == [
        "train: step 2 of 6 (33%), 0 min 40 s so far",  # the step's log comes after it
        "train: step 4 of 6 (66%), 1 min 20 s so far; loss 0.6931, acc 0.500"]
    quiet = progress.StepProgress(total=6, initial=0, show=False)
    for _ in range(6):
        quiet.update()
    assert capsys.readouterr().err == ""


def test_train_in_a_notebook_leaves_its_random_generators_and_reuses_its_finished_run(tmp_path, tiny_decoder):
    """In one process (a notebook): train seeded Python's, numpy's and torch's generators with train.seed, so
    every draw after a train repeated; and a try of other settings stopped after its first checkpoint (which
    replaced the finished run's) made the finished run train again from step 0, for the same weights."""
    import random

    import numpy as np

    from rm_lib import steps

    params = tiny_params(model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter")

    def seeded() -> None:
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    seeded()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    seeded()
    first = run_steps(params, tmp_path, "train")["train"]
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    model = {p.name: p.read_bytes() for p in (tmp_path / "models/reward_model").iterdir() if p.is_file()}
    records = {p.name: p.read_bytes() for p in (tmp_path / "data/train").iterdir()}

    def stop(record: dict) -> None:  # Ctrl-C after the try's first checkpoint
        if record.get("step", 0) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        steps.run("train", tiny_params("train.learning_rate=3e-4", model=str(tiny_decoder)), Layout(tmp_path),
                  on_log=stop)
    assert [p.name for p in (tmp_path / "models/checkpoints").glob("step-*")] == ["step-2"]  # the try's
    again = run_steps(params, tmp_path, "train")["train"]
    assert again.reused and again.steps == first.steps == 4
    assert again.summary().startswith("train: already trained at step 4; reused")
    assert {p.name: p.read_bytes() for p in (tmp_path / "models/reward_model").iterdir() if p.is_file()} == model
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/train").iterdir()} == records


def test_lora_settings_without_lora_are_said_to_do_nothing(tmp_path, tiny_decoder, capsys):
    """train.lora_r and lora_target_modules set (a TRL user's peft settings) without train.lora: the whole model
    trained and the settings were dropped without a word."""
    params = tiny_params("train.lora_r=8", "train.lora_target_modules=[q_proj]", "train.max_steps=1",
                         model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    assert ("train: note: train.lora_r, train.lora_target_modules set, but train.lora is false: the whole model "
            "trains and they do nothing") in capsys.readouterr().out


def test_a_rerun_of_a_finished_run_leaves_its_model_and_records_as_they_were(tmp_path, tiny_decoder):
    """Run again with its checkpoints in place, a finished run was reused and wrote summary.json again (`reused`,
    `resumed_from`): DVC saw train's outputs changed, and `dvc checkout` of another commit asked for -f. Its
    model and records stay byte for byte; the step still reports the reuse."""
    params = tiny_params(model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    outputs = [tmp_path / "models/reward_model", tmp_path / "data/train"]

    def files() -> dict:
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for folder in outputs for p in folder.rglob("*")
                if p.is_file()}

    before = files()
    again = run_steps(params, tmp_path, "train")["train"]
    assert again.reused and again.resumed_from == 4 and list((tmp_path / "models/checkpoints").glob("step-4"))
    assert files() == before
