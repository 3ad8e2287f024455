"""The GPU benchmark: its summary (ratios and the targets of the GPU goal, from whichever runs are
done), the command each run records, and the whole command rehearsed at toy size on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import HH, ROOT, need

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402
import bench_train  # noqa: E402
import gpu_check  # noqa: E402


def run(tokens_per_s: float, mfu: float | None, peak: float | None, accuracy: float, pairs_per_s: float = 1.0) -> dict:
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_gpu_mib": peak, "accuracy": accuracy,
            "pairs_per_s": pairs_per_s}


def test_targets_are_judged_against_both_trl_settings():
    runs = {"ours/hh": run(33_000, 0.45, 17_000, 0.640, pairs_per_s=30),
            "trl_default/hh": run(10_000, None, 17_400, 0.635),
            "trl_no_checkpointing/hh": run(12_000, None, 30_000, 0.635),
            "ours_per_sequence/hh": run(20_000, 0.45, 1, 0, pairs_per_s=20),
            "ours/alpaca": run(40_000, 0.35, 20_000, 0.80), "trl_default/alpaca": run(15_000, None, 17_800, 0.79),
            "trl_no_checkpointing/alpaca": run(18_000, None, 31_000, 0.79),
            "ours_memory_matched/alpaca": run(30_000, 0.3, 16_020, 0.795),
            "ours_token_batches/hh": run(60_000, 0.5, 60_000, 0.62)}
    cases = bench_gpu.summarize(runs)
    hh, alpaca = cases["hh"], cases["alpaca"]
    assert hh["tokens_per_s_vs_trl_default"] == pytest.approx(3.3)
    assert hh["tokens_per_s_vs_trl_no_checkpointing"] == pytest.approx(2.75)
    assert hh["targets"] == {"3x_trl_default": True, "3x_trl_no_checkpointing": False, "mfu_40": True,
                             "memory_at_most_trl": True, "accuracy_within_1_point": True}
    assert hh["shared_prompt_pairs_per_s_gain"] == pytest.approx(1.5)
    assert alpaca["targets"]["mfu_40"] is False and alpaca["targets"]["memory_at_most_trl"] is False
    assert alpaca["accuracy_points_vs_trl_default"] == pytest.approx(1.0)
    assert alpaca["targets"]["accuracy_within_1_point"]  # one point, to float rounding
    assert "shared_prompt_pairs_per_s_gain" not in alpaca
    assert alpaca["memory_matched"]["tokens_per_s_vs_trl_default"] == pytest.approx(2.0)
    assert alpaca["memory_matched"]["peak_gpu_vs_trl_default"] == pytest.approx(0.9)
    assert alpaca["memory_matched"]["tokens_per_s_vs_trl_no_checkpointing"] == pytest.approx(30 / 18)
    # a variant is compared, never judged: the targets stay those of the run at TRL's batch
    assert hh["token_batches"]["tokens_per_s_vs_trl_default"] == pytest.approx(6.0)
    assert hh["token_batches"]["accuracy_points_vs_trl_default"] == pytest.approx(-1.5)
    assert "token_batches" not in alpaca and hh["targets"]["accuracy_within_1_point"]


def test_the_accuracy_difference_is_paired_over_the_same_held_out_pairs():
    """Two models scored on the same 390 pairs that disagree on 7 (ours right on none of them): −1.8
    points, with a paired standard error of about sqrt(7)/390 (0.7 points), where each accuracy alone
    has 2.5. Without the pair-by-pair wins (a run recorded before they were) no error is claimed."""
    trl_wins = "1" * 230 + "0" * 153 + "1" * 7
    ours_wins = "1" * 230 + "0" * 160
    ours, trl = {"accuracy": 230 / 390, "wins": ours_wins}, {"accuracy": 237 / 390, "wins": trl_wins}
    points, error = bench_train.accuracy_difference(ours, trl)
    assert points == pytest.approx(-100 * 7 / 390)
    assert error == pytest.approx(100 * (7 / 390 * (1 - 7 / 390) / 389) ** 0.5) == pytest.approx(0.67, abs=0.01)
    assert bench_train.accuracy_difference(ours, {"accuracy": 237 / 390}) == (pytest.approx(-1.795, abs=1e-3), None)
    same = bench_train.accuracy_difference(ours, ours)
    assert same == (0, 0)
    cases = bench_gpu.summarize({"ours/hh": {**run(30_000, None, None, 230 / 390), "wins": ours_wins},
                                 "trl_default/hh": {**run(10_000, None, None, 237 / 390), "wins": trl_wins}})
    assert cases["hh"]["accuracy_points_standard_error"] == pytest.approx(error)
    assert cases["hh"]["targets"]["accuracy_within_1_point"] is False  # judged on the difference itself


def test_a_run_cut_short_judges_only_what_was_measured():
    cases = bench_gpu.summarize({"ours/hh": run(30_000, 0.41, None, 0.64),
                                 "trl_default/hh": run(10_000, None, None, 0.64),
                                 "ours/alpaca": run(40_000, 0.2, None, 0.8)})
    assert cases["hh"]["targets"] == {"mfu_40": True, "3x_trl_default": True, "accuracy_within_1_point": True}
    assert cases["alpaca"]["targets"] == {"mfu_40": False}  # nothing to compare with yet
    assert "tokens_per_s_vs_trl_no_checkpointing" not in cases["hh"]
    unknown_peak = bench_gpu.summarize({"ours/hh": run(30_000, None, None, 0.64)})
    assert unknown_peak["hh"]["targets"] == {}  # an MFU that could not be computed is not a failed target


def test_a_new_benchmark_sets_the_finished_one_aside(tmp_path):
    out = tmp_path / "gpu-nvidia-h200.json"
    out.write_text('{"runs": {"ours/hh": {}}}')
    assert bench_gpu.set_aside(out) == tmp_path / "gpu-nvidia-h200.previous.json"
    assert not out.exists() and '"ours/hh"' in (tmp_path / "gpu-nvidia-h200.previous.json").read_text()


def test_each_run_records_the_bench_train_command_that_includes_it():
    base = ["--model", "m", "--case", "hh"]
    commands = {name: bench_gpu.run_arguments(base, changes, as_command=True)
                for name, (_, _, changes) in bench_gpu.RUNS.items()}
    assert commands["ours/hh"] == base == commands["trl_default/hh"]
    assert commands["ours_per_sequence/hh"] == [*base, "--versus", "per-sequence"]
    assert commands["trl_no_checkpointing/hh"] == [*base, "--trl-gradient-checkpointing", "off"]
    # the run itself packs apart; its command runs both packings side by side
    assert bench_gpu.run_arguments(base, bench_gpu.RUNS["ours_per_sequence/hh"][2]) == [*base, "--no-shared-prompt"]
    parsed = bench_train.parse(commands["ours_memory_matched/hh"])
    assert parsed.ours_setting == bench_gpu.MEMORY_MATCHED
    assert "--ours-setting=train.gradient_checkpointing=true" in bench_train.passthrough(parsed)
    assert "--trl-bf16" in bench_train.passthrough(bench_train.parse(["--trl-bf16"]))  # the child trains TRL in bf16
    assert "--trl-bf16" not in bench_train.passthrough(parsed)


def test_without_a_gpu_the_benchmark_says_so_and_points_to_the_rehearsal():
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu.py"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 1
    assert "no CUDA device" in done.stderr and "--rehearse" in done.stderr


def test_a_gradient_zero_by_symmetry_is_no_disagreement_but_a_real_error_is():
    import torch

    torch.manual_seed(0)
    reference = {"w": torch.randn(64, 64), "bias_cancelled": torch.randn(64) * 1e-9, "small": torch.randn(8) * 1e-2}
    noisy = {k: v + torch.randn_like(v) * 1e-9 for k, v in reference.items()}
    worst, _ = gpu_check.gradient_disagreement(reference, noisy)
    assert worst < 2e-3  # the old measure (each tensor against itself alone) gave about 1 on the cancelled bias
    wrong = {**noisy, "small": reference["small"] * 1.1}
    worst, tensor = gpu_check.gradient_disagreement(reference, wrong)
    assert tensor == "small" and worst == pytest.approx(0.1, rel=1e-3)
    assert gpu_check.gradient_disagreement(reference, {"w": reference["w"]}) == (float("inf"), "bias_cancelled")


def test_a_failed_gpu_check_stops_the_benchmark_or_leaves_out_the_runs_it_concerns():
    names = list(bench_gpu.RUNS)
    paths = {name: {"ok": True, "runs": runs} for name, *_, runs in gpu_check.FLEX_PATHS + gpu_check.VARLEN_PATHS}

    def failing(*failed: str) -> dict:
        return {**paths, **{name: {**paths[name], "ok": False} for name in failed}}

    assert bench_gpu.runs_to_do(names, None) == names  # --skip-check
    assert bench_gpu.runs_to_do(names, paths) == names
    compiled = bench_gpu.runs_to_do(names, failing("shared-prompt, compiled layers"))
    assert compiled == [n for n in names if n != "ours_compiled/hh"]
    varlen_runs = ["ours_varlen/hh", "ours_varlen_token_batches/hh", "ours_varlen/alpaca"]
    varlen = bench_gpu.runs_to_do(names, failing("varlen shared-prompt (fp16)"))
    assert varlen == [n for n in names if n not in varlen_runs]
    both = bench_gpu.runs_to_do(names, failing("varlen per-sequence (fp16)", "shared-prompt, compiled layers"))
    assert both == [n for n in names if n not in varlen_runs and n != "ours_compiled/hh"]
    # no run times compiled layers with varlen: a disagreement there is reported, and every run goes
    assert bench_gpu.runs_to_do(names, failing("varlen shared-prompt, compiled layers (fp16)")) == names
    # a torch without the kernel: its runs would fail at the settings check
    no_kernel = {**paths, "varlen": {"ok": False, "runs": ["ours_varlen"]}}
    assert bench_gpu.runs_to_do(names, no_kernel) == [n for n in names if n not in varlen_runs]
    with pytest.raises(SystemExit, match="flex_attention path disagrees"):
        bench_gpu.runs_to_do(names, failing("shared-prompt"))


def test_the_gpu_check_passes_on_the_cpu_path_of_a_pythia_decoder(tmp_path, aot_eager_compiles):
    """The check's comparison, run where the CPU trains (masked SDPA on packed rows): the GPT-NeoX
    final layer norm's bias gets only rounding noise (a pair's two score gradients cancel), which the
    check once took for a disagreement of the flex_attention path on an H200. Compiled layers are
    compiled by dynamo with the aot_eager backend here (inductor on a GPU)."""
    import pythia_1b_shape
    import torch

    from rm_lib.model.modeling import load_reward_model, load_tokenizer

    folder = pythia_1b_shape.build(tmp_path / "small-decoder", "default", small=True)
    tokenizer = load_tokenizer(str(folder))
    torch.manual_seed(0)
    model = load_reward_model(str(folder), pad_token_id=tokenizer.pad_token_id)
    report = gpu_check.compare(model, gpu_check.pairs_with_prompts(8, 50_000), tokenizer.pad_token_id, "sdpa")
    for name, figures in report.items():
        assert figures["ok"], (name, figures)
    assert report["shared-prompt"]["tokens_computed"] < report["per-sequence"]["tokens_computed"]
    assert len(report) == 3 and all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())


def test_the_pythia_shape_reads_the_benchmarks_1024_tokens_not_its_tokenizers_first_models_512(tmp_path):
    """The shape carries all-MiniLM-L6-v2's tokenizer, whose limit is that model's 512 positions: since
    filter checks the limit, the GPU benchmark's data preparation at max length 1024 was refused."""
    import pythia_1b_shape

    from rm_lib.model.modeling import load_model_config, load_tokenizer, max_sequence_length

    folder = pythia_1b_shape.build(tmp_path / "pythia-1b-shape-config", "default", weights=False)
    limit = max_sequence_length(load_model_config(str(folder), weights=False), load_tokenizer(str(folder)))
    assert limit == 2048  # its positions; 1024 passes filter's check
    # a folder built before (its tokenizer saying 512) is not taken as built: the commands build it again
    assert pythia_1b_shape.is_built(folder)
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**saved, "model_max_length": 512}))
    assert not pythia_1b_shape.is_built(folder)


@pytest.mark.integration
def test_the_whole_command_rehearsed_on_the_cpu_writes_every_run_and_resumes(tmp_path):
    need(HH)
    # the memory-bound variants are ours with other settings: their commands and summaries have tests of their own
    first = ["ours/hh", "trl_default/hh"]
    then = ["ours_per_sequence/hh"]

    # everything it writes (prepared data, models, the results log) under tmp_path, none in the repository
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RM_BENCH_WORK": str(tmp_path / "work"),
           "RM_BENCH_LOG": str(tmp_path / "results.jsonl")}
    out = tmp_path / "out"

    def bench(*runs: str, resume: bool = False) -> tuple[str, dict]:
        command = [sys.executable, "benchmarks/bench_gpu.py", "--rehearse", "--data", str(HH.parent),
                   "--out", str(out), *(["--resume"] if resume else []), *(f"--run={r}" for r in runs)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        [written] = list(out.glob("rehearsal-*.json"))
        return done.stdout, json.loads(written.read_text())

    _, before = bench(*first)
    assert list(before["runs"]) == first
    stdout, payload = bench(*first, *then, resume=True)
    assert [line.split(":")[0] for line in stdout.splitlines() if "real tok/s" in line] == then  # only the new run
    assert payload["runs"]["ours/hh"] == before["runs"]["ours/hh"]
    assert payload["rehearsal"] and list(payload["runs"]) == first + then
    for name, figures in payload["runs"].items():
        assert figures["case"] == "hh" and figures["pairs"] == 48 and figures["tokens_per_s"] > 0, name
        assert figures["steady_tokens_per_s"] > 0, name  # 12 steps: one logging window past the warm-up
        assert figures["steps"] == 12, name
        assert 0 <= figures["accuracy"] <= 1
        wins = figures["wins"]  # held-out pair by pair, for the paired accuracy difference
        assert len(wins) == figures["test_pairs"] and figures["accuracy"] == pytest.approx(wins.count("1") / len(wins))
    assert payload["runs"]["trl_default/hh"]["trainer"] == "trl"
    # our runs keep the device plan's choices (and, on a GPU, its predicted peak beside the measured one)
    assert payload["runs"]["ours/hh"]["device_plan"]["why"] == "on a CPU"
    assert payload["runs"]["trl_default/hh"]["device_plan"] is None
    # shared prompts compute fewer tokens than per-sequence packing of the same pairs
    assert payload["runs"]["ours/hh"]["computed_tokens_per_s"] < payload["runs"]["ours/hh"]["tokens_per_s"]
    per_sequence = payload["runs"]["ours_per_sequence/hh"]
    assert per_sequence["computed_tokens_per_s"] == pytest.approx(per_sequence["tokens_per_s"])
    hh = payload["cases"]["hh"]
    assert {"tokens_per_s_vs_trl_default", "steady_tokens_per_s_vs_trl_default",
            "shared_prompt_pairs_per_s_gain"} <= set(hh)
    assert hh["accuracy_points_standard_error"] is not None
    assert set(hh["targets"]) == {"3x_trl_default", "accuracy_within_1_point"}  # no GPU memory or peak on a CPU
    assert payload["commands"]["ours_per_sequence/hh"].endswith("--case hh --versus per-sequence")
    assert payload["versions"]["trl"] and payload["gpu_check"] is None

    # a resumed benchmark is the same benchmark: other settings are refused, the file kept
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--rehearse", "--data", str(HH.parent),
                           "--out", str(out), "--resume", "--max-length", "128", "--run=ours/hh"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "other settings" in done.stderr
    assert json.loads(next(out.glob("rehearsal-*.json")).read_text())["runs"] == payload["runs"]
    assert set(payload["inputs"]) == {"code", "data/hh", "model"}
    logged = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [list(entry["runs"]) for entry in logged] == [first, first + then]


def stand_in_benchmark(tmp_path, monkeypatch):
    """Data files, a model folder and an output folder for bench_gpu.main whose runs a test stands in
    for (bench_train.run_child); nothing is prepared."""
    data, model, out = tmp_path / "data", tmp_path / "model", tmp_path / "out"
    data.mkdir()
    model.mkdir()
    for name in bench_train.FILES.values():
        (data / name).write_bytes(b"rows")
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(bench_train, "WORK", tmp_path / "work")
    monkeypatch.setenv("RM_BENCH_LOG", str(tmp_path / "results.jsonl"))
    monkeypatch.setattr(bench_train, "prepare", lambda args, case: None)
    return data, model, out


def test_a_run_past_its_time_is_recorded_unfinished_and_the_next_runs_still_go(tmp_path, monkeypatch):
    """A stalled or failed run must not take the rest of a GPU lease: it is stopped, what it reached is
    kept, the benchmark goes on, and --resume tries it again."""
    data, model, out = stand_in_benchmark(tmp_path, monkeypatch)
    log = tmp_path / "work" / "hh" / "ours" / "models" / "checkpoints" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    calls = []

    def child(args, case, trainer, timeout=None):
        calls.append((case, trainer, timeout))
        if (case, trainer, args.ours_setting) == ("hh", "ours", bench_gpu.TOKEN_BATCHES):
            log.write_text(json.dumps({"step": 10, "elapsed_s": 41.5, "padding_fraction": 0.0}) + "\n")
            raise subprocess.TimeoutExpired("bench_train.py", timeout)
        if (case, trainer) == ("alpaca", "trl"):  # a run that fails (at evaluation, say) is no reason to stop
            raise subprocess.CalledProcessError(1, "bench_train.py")
        return run(20_000 if trainer == "ours" else 5_000, None, None, 0.6)

    monkeypatch.setattr(bench_train, "run_child", child)
    runs = ["ours/hh", "trl_default/hh", "ours_token_batches/hh", "trl_default/alpaca", "ours/alpaca"]
    common = ["--rehearse", "--skip-check", "--model", str(model), "--data", str(data), "--out", str(out),
              "--run-timeout", "30", *(f"--run={r}" for r in runs)]
    payload = bench_gpu.main(common)
    assert list(payload["runs"]) == ["ours/hh", "trl_default/hh", "ours/alpaca"]
    stopped = payload["unfinished"]["ours_token_batches/hh"]
    assert stopped["stopped_after_s"] == 30 and stopped["last_logged_step"] == 10 and stopped["elapsed_s_at_it"] == 41.5
    assert stopped["command"].endswith("--ours-setting=train.batch_tokens=16384")
    # paths inside the repository are recorded relative to it; others as given
    assert bench_gpu.shown(str(ROOT / "benchmarks" / ".work" / "m")) == "benchmarks/.work/m"
    assert payload["settings"][:2] == ["--model", str(model)]
    assert payload["unfinished"]["trl_default/alpaca"]["failed_with_exit_status"] == 1
    assert "last_logged_step" not in payload["unfinished"]["trl_default/alpaca"]  # TRL's log is its own
    assert all(timeout == 30 for *_, timeout in calls)
    [written] = out.glob("rehearsal-*.json")
    assert json.loads(written.read_text())["unfinished"] == payload["unfinished"]

    calls.clear()
    monkeypatch.setattr(bench_train, "run_child", lambda args, case, trainer, timeout=None:
                        calls.append((case, trainer)) or run(30_000, None, None, 0.6))
    again = bench_gpu.main([*common, "--resume"])
    assert calls == [("hh", "ours"), ("alpaca", "trl")]  # only the unfinished runs
    assert again["unfinished"] == {} and "ours_token_batches/hh" in again["runs"]


def test_ours_within_trls_memory_takes_the_peak_trl_measured_on_the_same_case(tmp_path, monkeypatch):
    """The memory target's run: our trainer held (train.gpu_memory_gib) to the peak that TRL at its
    defaults reached on the same case; before TRL has run, it waits, and --resume makes it."""
    data, model, out = stand_in_benchmark(tmp_path, monkeypatch)
    settings = []

    def child(args, case, trainer, timeout=None):
        settings.append((case, trainer, list(args.ours_setting)))
        return run(5_000, None, 17_354.6, 0.6) if trainer == "trl" else run(20_000, None, 17_000, 0.6)

    monkeypatch.setattr(bench_train, "run_child", child)
    common = ["--rehearse", "--skip-check", "--model", str(model), "--data", str(data), "--out", str(out)]
    payload = bench_gpu.main([*common, "--run=ours_within_trl_memory/hh", "--run=trl_default/hh"])
    assert "trl_default/hh" in payload["runs"] and settings == [("hh", "trl", [])]
    waiting = payload["unfinished"]["ours_within_trl_memory/hh"]
    assert waiting["needs"].startswith("the peak GPU memory of trl_default/hh")
    again = bench_gpu.main([*common, "--resume", "--run=ours_within_trl_memory/hh", "--run=trl_default/hh"])
    assert settings[-1] == ("hh", "ours", ["train.gpu_memory_gib=16.9473"])  # 17,354 MiB
    assert again["unfinished"] == {}
    assert again["commands"]["ours_within_trl_memory/hh"].endswith("--ours-setting=train.gpu_memory_gib=16.9473")
    assert again["cases"]["hh"]["within_trl_memory"]["peak_gpu_vs_trl_default"] == pytest.approx(17_000 / 17_354.6)


def test_an_earlier_runs_training_log_is_not_taken_for_a_stopped_runs_progress(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(bench_train, "WORK", tmp_path)
    log = tmp_path / "hh" / "ours" / "models" / "checkpoints" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"step": 60, "elapsed_s": 17.0}) + "\n")
    os.utime(log, (time.time() - 120, time.time() - 120))
    assert bench_train.progress("hh", "ours", since=time.time() - 60) == {"last_logged_step": None}
    assert bench_train.progress("hh", "ours", since=time.time() - 180) == {"last_logged_step": 60,
                                                                         "elapsed_s_at_it": 17.0}
    assert bench_train.progress("hh", "trl", since=0) == {}


def test_the_mfu_peak_is_the_devices_own_not_that_of_a_name_it_contains():
    """torch's names of the PCIe and NVL cards contain the SXM card's; A10G contains A10."""
    peaks = {name: bench_train.peak_of(name) for name in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
        "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S", "NVIDIA A10",
        "NVIDIA A10G", "NVIDIA L4", "NVIDIA RTX A1000")}
    assert {name: found and found[1] / 1e12 for name, found in peaks.items()} == {
        "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
        "NVIDIA H200 NVL": 835, "NVIDIA GH200 480GB": 989, "NVIDIA A100-SXM4-80GB": 312,
        "NVIDIA A100 80GB PCIe": 312, "NVIDIA L40S": 362, "NVIDIA A10": 125, "NVIDIA A10G": 70,
        "NVIDIA L4": None, "NVIDIA RTX A1000": None}
    assert peaks["NVIDIA H100 PCIe"][0] == "H100 PCIe"  # the key the run records as its peak_from
    assert bench_train.device_peak_flops(500) == (500e12, "--peak-tflops")


def test_the_preflight_names_what_the_runs_cannot_import_or_would_be_refused(monkeypatch):
    """On a bare CUDA image without matplotlib the filter step's plots failed at `prepare`, after
    gpu_check had spent its device time; the preflight names every such gap in one line, first."""
    import importlib.metadata

    import torch

    bench_gpu.preflight(["ours/hh", "ours_varlen/hh"], on_gpu=False)  # this environment has it all
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # as if matplotlib were not installed
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.20.0" if name == "tokenizers" else real_version(name))
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    with pytest.raises(SystemExit) as stopped:
        bench_gpu.preflight(["ours/hh", "ours_varlen/hh"], on_gpu=False)
    message = str(stopped.value)
    assert "\n" not in message and "matplotlib.pyplot does not import" in message
    assert f"tokenizers 0.20.0 (transformers {real_version('transformers')} needs" in message
    assert "torch 2.9.1+cu128 (the varlen runs need 2.10 or later; leave out ours_varlen/hh" in message
    assert "offline-wheels.txt" in message
    with pytest.raises(SystemExit) as stopped:  # without varlen runs an older torch is no problem
        bench_gpu.preflight(["ours/hh"], on_gpu=False)
    assert "varlen" not in str(stopped.value)


def test_the_cpu_work_comes_before_the_gpu_check(tmp_path, monkeypatch):
    """Imports, data and model are checked and prepared before gpu_check takes the device."""
    import torch

    data, model, out = stand_in_benchmark(tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr(bench_gpu, "cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    monkeypatch.setattr(bench_gpu, "preflight", lambda names, on_gpu: calls.append(("preflight", on_gpu)))
    monkeypatch.setattr(bench_train, "prepare", lambda args, case: calls.append(("prepare", case)))
    monkeypatch.setattr(gpu_check, "check", lambda **kw: calls.append(("gpu_check",)) or {})
    monkeypatch.setattr(bench_train, "run_child", lambda args, case, trainer, timeout=None:
                        calls.append(("run", case, trainer)) or run(20_000, None, None, 0.6))
    payload = bench_gpu.main(["--model", str(model), "--data", str(data), "--out", str(out),
                              "--run=ours/hh", "--run=trl_default/alpaca"])
    assert calls == [("preflight", True), ("prepare", "alpaca"), ("prepare", "hh"), ("gpu_check",),
                     ("run", "hh", "ours"), ("run", "alpaca", "trl")]
    assert payload["gpu_check"] == {} and (out / "gpu-nvidia-h100-pcie.json").exists()
