"""The GPU benchmark, one command: rm_lib's trainer against TRL's RewardTrainer on a Pythia-1B-shaped
decoder (bf16, max length 1024) on both shared data sets, on this machine's GPU.

    pip install torch -e ".[bench]"       # a CUDA build of torch, the project and TRL
    python benchmarks/bench_gpu.py        # writes benchmarks/results/gpu-<device>.json
    python benchmarks/bench_gpu.py --rehearse   # any machine, CPU too: every step at toy size

First what needs no GPU, so that a gap costs no device time: the imports and versions the runs need
(`preflight`), the model and the data. Then the gradient check of the packed paths (gpu_check.py), then
each training run in its own process, the most telling first: on hh-rlhf, then alpaca-eval, ours and
TRL at its defaults (both at batch 16 pairs), ours with FlashAttention's variable-length kernel
(train.attention=varlen) and ours with 16,384-token batches; TRL with gradient checkpointing off on
both; ours with per-sequence packing on hh-rlhf (the gain of shared prompts); ours with activation
checkpointing and 16,384 tokens per forward (memory against TRL's), and ours held to TRL's measured
peak (train.gpu_memory_gib: the device plan checkpoints as few layers as fit under it). The JSON is
rewritten after every run, so a run cut short keeps what it measured (--resume goes on from there); it
holds the device, versions, the command of every run, their figures and the targets of the GPU issue
checked.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import bench_train
import gpu_check
import pythia_1b_shape
import record

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Our trainer's variants beside its run at TRL's batch of 16 pairs: token-budgeted batches (the loss
# still the mean over each batch's pairs), and activation checkpointing on with smaller forwards, for
# memory against TRL's
TOKEN_BATCHES = ["train.batch_tokens=16384"]  # 2-3x TRL's real tokens a step; 19 steps on hh, 37 on alpaca
MEMORY_MATCHED = ["train.gradient_checkpointing=true", "train.max_tokens_per_forward=16384"]
COMPILED = ["train.compile=true"]  # each transformer layer compiled: fused kernels past a longer first compile
# FlashAttention's variable-length kernel instead of flex_attention: nothing compiled, no block mask
VARLEN = ["train.attention=varlen"]
VARIANTS = {"ours_token_batches": TOKEN_BATCHES, "ours_compiled": COMPILED, "ours_varlen": VARLEN,
            "ours_varlen_token_batches": VARLEN + TOKEN_BATCHES,
            "ours_memory_matched": MEMORY_MATCHED}
# ours held to the peak GPU memory TRL at its defaults measured on the same case, just before
# (train.gpu_memory_gib): the device plan checkpoints the fewest layers that fit under it
WITHIN_TRL_MEMORY = "ours_within_trl_memory"
# name -> (case, trainer, changes to the shared arguments); they run in this order, the most telling first
RUNS = {
    "ours/hh": ("hh", "ours", {}),
    "trl_default/hh": ("hh", "trl", {}),
    "ours_varlen/hh": ("hh", "ours", {"ours_setting": VARLEN}),
    "ours_token_batches/hh": ("hh", "ours", {"ours_setting": TOKEN_BATCHES}),
    # bigger forwards with nothing compiled: whether the 16,384-token run's stall came from compiling
    "ours_varlen_token_batches/hh": ("hh", "ours", {"ours_setting": VARLEN + TOKEN_BATCHES}),
    "ours_compiled/hh": ("hh", "ours", {"ours_setting": COMPILED}),
    "ours/alpaca": ("alpaca", "ours", {}),
    "trl_default/alpaca": ("alpaca", "trl", {}),
    "ours_token_batches/alpaca": ("alpaca", "ours", {"ours_setting": TOKEN_BATCHES}),
    "ours_varlen/alpaca": ("alpaca", "ours", {"ours_setting": VARLEN}),
    "trl_no_checkpointing/hh": ("hh", "trl", {"trl_gradient_checkpointing": "off"}),
    "trl_no_checkpointing/alpaca": ("alpaca", "trl", {"trl_gradient_checkpointing": "off"}),
    "ours_per_sequence/hh": ("hh", "ours", {"shared_prompt": False}),
    "ours_memory_matched/hh": ("hh", "ours", {"ours_setting": MEMORY_MATCHED}),
    "ours_memory_matched/alpaca": ("alpaca", "ours", {"ours_setting": MEMORY_MATCHED}),
    f"{WITHIN_TRL_MEMORY}/hh": ("hh", "ours", {"within_peak_of": "trl_default/hh"}),
    f"{WITHIN_TRL_MEMORY}/alpaca": ("alpaca", "ours", {"within_peak_of": "trl_default/alpaca"}),
}


# What the runs import, tried before anything costly: a bare CUDA image that lacks one would fail at
# `prepare` (matplotlib, for the filter step's plots) or in a run, after gpu_check had spent its time
MODULES = ("numpy", "yaml", "pyarrow", "pandas", "tokenizers", "safetensors", "huggingface_hub", "accelerate",
           "transformers", "datasets", "trl", "peft", "PIL", "matplotlib.pyplot",
           "rm_lib.steps.filter", "rm_lib.steps.train", "rm_lib.steps.evaluate")
# the packages transformers checks the versions of as it is imported (its dependency_versions_check)
CHECKED_BY_TRANSFORMERS = ("tqdm", "regex", "packaging", "filelock", "numpy", "tokenizers", "huggingface-hub",
                           "safetensors", "accelerate", "pyyaml")
VARLEN_TORCH = "2.10"  # torch.nn.attention.varlen


def version_problems() -> list[str]:
    """The packages transformers checks at import that are absent or outside its floors (and ceilings),
    read from the installed metadata alone, without importing it."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        needs, own = metadata.requires("transformers") or [], metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return []  # the import below names it
    problems = []
    for requirement in map(Requirement, needs):
        name = canonicalize_name(requirement.name)
        if name not in CHECKED_BY_TRANSFORMERS or (requirement.marker and
                                                   not requirement.marker.evaluate({"extra": "torch"})):
            continue
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            found = None
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            problems.append(f"{name} {found or 'absent'} (transformers {own} needs {requirement.specifier})")
    return problems


def preflight(names: list[str], on_gpu: bool) -> None:
    """Exit with one line naming every module that does not import, every version transformers would
    refuse, a torch too old for the varlen runs chosen, and on a GPU a C compiler or Python headers missing
    (Triton builds its launcher with them): all found on the CPU, before the device does any work."""
    import importlib
    import shutil
    import sysconfig

    problems = version_problems()
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # an ImportError, or a version check that raised on import
            problems.append(f"{module} does not import ({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})")
    import torch
    from packaging.version import Version

    varlen = [n for n in names if any(s in VARLEN for s in RUNS[n][2].get("ours_setting", []))]
    if varlen and Version(torch.__version__.split("+")[0]) < Version(VARLEN_TORCH):
        problems.append(f"torch {torch.__version__} (the varlen runs need {VARLEN_TORCH} or later; leave out "
                        f"{', '.join(varlen)} with --run)")
    if on_gpu:
        if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
            problems.append("no C compiler (cc or gcc; Triton builds its launcher with it)")
        if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
            problems.append(f"no Python headers ({sysconfig.get_paths()['include']}/Python.h; Triton's launcher "
                            "includes it)")
    if problems:
        sys.exit(f"bench_gpu: before any run: {'; '.join(problems)}. The wheels of benchmarks/offline-wheels.txt "
                 "and what BENCHMARKS.md's 'On a GPU machine without network' lists make up what it needs")


def versions() -> dict:
    import importlib.metadata as metadata

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "trl", "accelerate", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def summarize(runs: dict[str, dict]) -> dict:
    """Per case, from whichever runs are done: the ratios and the targets (>= 3x TRL's real tokens/s
    at both TRL settings, MFU >= 40%, peak GPU memory <= TRL's at defaults, accuracy within one point,
    judged on the difference, with its paired standard error beside it); a target whose runs are
    missing is left out."""
    cases: dict[str, dict] = {}
    for case in sorted({name.split("/")[1] for name in runs}):
        mine, default, no_gc = (runs.get(f"{n}/{case}") for n in ("ours", "trl_default", "trl_no_checkpointing"))
        c: dict = {}
        targets: dict = {}
        if mine and mine.get("mfu") is not None:  # unknown where the device's peak is
            targets["mfu_40"] = mine["mfu"] >= 0.40
        if mine and default:
            c["tokens_per_s_vs_trl_default"] = mine["tokens_per_s"] / default["tokens_per_s"]
            c["peak_gpu_vs_trl_default"] = ratio(mine.get("peak_gpu_mib"), default.get("peak_gpu_mib"))
            c["accuracy_points_vs_trl_default"], c["accuracy_points_standard_error"] = \
                bench_train.accuracy_difference(mine, default)
            targets["3x_trl_default"] = c["tokens_per_s_vs_trl_default"] >= 3
            if c["peak_gpu_vs_trl_default"] is not None:
                targets["memory_at_most_trl"] = c["peak_gpu_vs_trl_default"] <= 1
            targets["accuracy_within_1_point"] = round(abs(c["accuracy_points_vs_trl_default"]), 6) <= 1
        if mine and no_gc:
            c["tokens_per_s_vs_trl_no_checkpointing"] = mine["tokens_per_s"] / no_gc["tokens_per_s"]
            targets["3x_trl_no_checkpointing"] = c["tokens_per_s_vs_trl_no_checkpointing"] >= 3
        # past the first ten steps (compilation, warm-up): shown beside the whole-run figures the targets use
        for name, peer in (("trl_default", default), ("trl_no_checkpointing", no_gc)):
            if mine and peer:
                c[f"steady_tokens_per_s_vs_{name}"] = ratio(mine.get("steady_tokens_per_s"),
                                                           peer.get("steady_tokens_per_s"))
        for variant in (*VARIANTS, WITHIN_TRL_MEMORY):  # the same comparisons for each variant, apart from the targets
            other = runs.get(f"{variant}/{case}")
            if other and default:
                points, error = bench_train.accuracy_difference(other, default)
                c[variant.removeprefix("ours_")] = {
                    "tokens_per_s_vs_trl_default": other["tokens_per_s"] / default["tokens_per_s"],
                    "tokens_per_s_vs_trl_no_checkpointing": ratio(other["tokens_per_s"],
                                                                  no_gc["tokens_per_s"] if no_gc else None),
                    "mfu": other.get("mfu"),
                    "peak_gpu_vs_trl_default": ratio(other.get("peak_gpu_mib"), default.get("peak_gpu_mib")),
                    "accuracy_points_vs_trl_default": points, "accuracy_points_standard_error": error}
        per_sequence = runs.get(f"ours_per_sequence/{case}")
        if mine and per_sequence:
            c["shared_prompt_pairs_per_s_gain"] = mine["pairs_per_s"] / per_sequence["pairs_per_s"]
        c["targets"] = targets
        cases[case] = c
    return cases


def inputs(args: argparse.Namespace, cases: list[str]) -> dict:
    """What the figures also depend on beyond the arguments: the code both trainers run (rm_lib's
    train step and these scripts), each data file's bytes and the model's config and tokenizer."""
    from rm_lib.pipeline.code_version import code_hash

    scripts = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(HERE.glob("*.py")))).hexdigest()[:16]
    found = {"code": f"{code_hash('train')}-{scripts}"}
    for case in cases:
        found[f"data/{case}"] = hashlib.sha256((args.data / bench_train.FILES[case]).read_bytes()).hexdigest()[:16]
    found["model"] = hashlib.sha256(b"".join((args.model / name).read_bytes() for name in
                                             ("config.json", "tokenizer.json") if (args.model / name).exists())
                                    ).hexdigest()[:16]
    return found


def set_aside(out: Path) -> Path:
    """A finished benchmark is never lost to a new one: it becomes <name>.previous.json."""
    previous = out.with_suffix(".previous.json")
    out.replace(previous)
    return previous


def runs_to_do(names: list[str], check: dict | None) -> list[str]:
    """The runs to measure after `gpu_check`: none (exit) when the default path disagrees with padded
    batches; without the runs of a variant whose path does (each path of the check names its runs:
    they would time a model that trains wrong)."""
    wrong = {path: figures for path, figures in (check or {}).items() if not figures["ok"]}
    if any(figures.get("runs") is None for figures in wrong.values()):
        sys.exit(f"bench_gpu: the flex_attention path disagrees with padded batches: {json.dumps(check)}")
    left_out = tuple(sorted({run for figures in wrong.values() for run in figures["runs"]}))
    if wrong:
        print(f"bench_gpu: {', '.join(wrong)} disagree with padded batches ({json.dumps(check)}); "
              f"the runs left out: {', '.join(left_out) or 'none'}", file=sys.stderr)
    return [name for name in names if not name.split("/")[0].startswith(left_out)]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_arguments(base: list[str], changes: dict, *, as_command: bool = False) -> list[str]:
    """The bench_train.py arguments of one run: the shared ones with the run's changes. `as_command`:
    those of the bench_train.py command whose two runs include this one (per-sequence packing is
    the second run of `--versus per-sequence`)."""
    extra = []
    if changes.get("shared_prompt") is False:
        extra += ["--versus", "per-sequence"] if as_command else ["--no-shared-prompt"]
    if "trl_gradient_checkpointing" in changes:
        extra += ["--trl-gradient-checkpointing", changes["trl_gradient_checkpointing"]]
    extra += [f"--ours-setting={s}" for s in changes.get("ours_setting", [])]
    return [*base, *extra]


def memory_limit(changes: dict, runs: dict, rehearse: bool) -> dict | None:
    """A run's changes with train.gpu_memory_gib set to the peak of the run it is held to (its
    `within_peak_of`); None while that run has no peak to give. Rehearsed on a CPU, the peer's peak
    host memory stands in (the setting does nothing there): the command is what is rehearsed."""
    if "within_peak_of" not in changes:
        return changes
    peer = runs.get(changes["within_peak_of"]) or {}
    peak = peer.get("peak_gpu_mib") or (peer.get("peak_rss_mib") if rehearse else None)
    if not peak:
        return None
    setting = f"train.gpu_memory_gib={int(peak) / 1024:.4f}"  # the peak to the MiB, in GiB
    return {**changes, "ours_setting": [*changes.get("ours_setting", []), setting]}


def shown(argument: str) -> str:
    """An argument as the JSON records it: a path inside this repository relative to its root, so a
    committed result names no machine's folders."""
    path = Path(argument)
    if path.is_absolute() and path.is_relative_to(bench_train.ROOT):
        return str(path.relative_to(bench_train.ROOT))
    return argument


def result_path(out: Path, device: str, rehearse: bool) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    return out / (f"rehearsal-{name}.json" if rehearse else f"gpu-{name}.json")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="default: a Pythia-1B shape built in benchmarks/.work (the small decoder with --rehearse)")
    parser.add_argument("--tokenizer", default="default",
                        help="the tokenizer the built model gets: a folder or a Hub name (default: all-MiniLM-L6-v2's)")
    parser.add_argument("--data", type=Path, default=bench_train.DATA, help="the folder holding the two data files")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON goes (default: benchmarks/results, benchmarks/.work with --rehearse)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train-pairs", type=int, default=1000, help="per data set, a seeded subset")
    parser.add_argument("--max-test-pairs", type=int, default=400)
    parser.add_argument("--run", action="append", choices=list(RUNS), help="default: every run, in this order")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU (default: known GPUs by name)")
    parser.add_argument("--skip-check", action="store_true", help="do not run gpu_check.py first")
    parser.add_argument("--run-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a run that takes longer, record how far it got under 'unfinished' (as a run "
                             "that fails is), and go on with the next (default: no limit)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs (and the check) already in the output JSON of this device; run the rest")
    parser.add_argument("--rehearse", action="store_true",
                        help="at toy size, on any machine (the CPU where there is no GPU): the small decoder, 48 "
                             "pairs per data set in batches of 4, max length 256; every step of the benchmark, so "
                             "the command is known to work")
    args = parser.parse_args(argv)
    if args.rehearse:
        args.max_length, args.batch_size = min(args.max_length, 256), min(args.batch_size, 4)  # 12 steps
        args.max_train_pairs, args.max_test_pairs = min(args.max_train_pairs, 48), min(args.max_test_pairs, 32)
        args.skip_check = args.skip_check or not cuda()
    args.own_model = args.model is None  # a folder the benchmark builds (and builds again when stale)
    args.model = args.model or bench_train.WORK / ("small-decoder" if args.rehearse else "pythia-1b-shape")
    args.out = args.out or (bench_train.WORK if args.rehearse else RESULTS)
    return args


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse(argv)
    if not args.rehearse and not cuda():
        sys.exit("bench_gpu: no CUDA device (the CPU benchmark is bench_train.py; --rehearse runs this at toy size)")
    device = torch.cuda.get_device_name() if cuda() else f"cpu {platform.machine()}"
    names = args.run or list(RUNS)
    cases = sorted({RUNS[n][0] for n in names})
    # what the CPU can do first, so that a missing module or file costs no device time: the imports, the
    # data, the model, the resume check; then gpu_check
    preflight(names, cuda())
    bench_train.check_data(args, cases)
    # the benchmark's own folder, also one built before its tokenizer read the shape's positions; a --model
    # of the user's is never written over
    if not (args.model / "config.json").exists() or (args.own_model and not pythia_1b_shape.is_built(args.model)):
        build = [sys.executable, str(HERE / "pythia_1b_shape.py"), str(args.model), "--tokenizer", args.tokenizer]
        subprocess.run([*build, *(["--small"] if args.rehearse else [])], check=True)
    base = ["--model", str(args.model), "--data", str(args.data), "--max-length", str(args.max_length),
            "--batch-size", str(args.batch_size), "--max-train-pairs", str(args.max_train_pairs),
            "--max-test-pairs", str(args.max_test_pairs),
            *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])]
    for case in cases:
        bench_train.prepare(bench_train.parse([*base, "--case", case]), case)
    out = result_path(args.out, device, args.rehearse)
    earlier = json.loads(out.read_text()) if args.resume and out.exists() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": device, "versions": versions(), "gpu_check": None, "rehearsal": args.rehearse,
               "settings": [shown(a) for a in base], "inputs": inputs(args, cases),
               "commands": {}, "runs": {}, "unfinished": {}, "cases": {}}
    if earlier:
        same = all(earlier.get(k) == payload[k] for k in ("settings", "versions"))
        if not same or any(earlier.get("inputs", {}).get(k, v) != v for k, v in payload["inputs"].items()):
            sys.exit(f"bench_gpu: {out} was measured with other settings, versions, code, data or model; --resume "
                     "only continues the same benchmark (move that file away to start anew)")
        payload["inputs"] = {**earlier.get("inputs", {}), **payload["inputs"]}
        payload.update(commands=earlier["commands"], runs=earlier["runs"], cases=earlier["cases"],
                       unfinished=earlier.get("unfinished", {}))
    elif out.exists():
        print(f"bench_gpu: the earlier {out.name} is now {set_aside(out).name}", flush=True)
    check = earlier.get("gpu_check") if earlier else None
    if check is None and not args.skip_check:
        check = gpu_check.check(tokenizer_name=args.tokenizer)
        torch.cuda.empty_cache()  # the check's memory back before the runs plan theirs
    payload["gpu_check"] = check
    names = runs_to_do(names, check)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    for name in (n for n in names if n not in payload["runs"]):
        case, trainer, changes = RUNS[name]
        changes = memory_limit(changes, payload["runs"], args.rehearse)
        if changes is None:
            peer = RUNS[name][2]["within_peak_of"]
            payload["unfinished"][name] = {"needs": f"the peak GPU memory of {peer}: run it first"}
            out.write_text(json.dumps(payload, indent=1) + "\n")
            print(f"{name}: unfinished: it needs {peer}'s peak GPU memory", flush=True)
            continue
        arguments = run_arguments([*base, "--case", case], changes)
        run_args = bench_train.parse(arguments)
        run_args.case = case
        started, began = time.perf_counter(), time.time()
        command = " ".join(["python benchmarks/bench_train.py",
                            *map(shown, run_arguments([*base, "--case", case], changes, as_command=True))])
        try:
            payload["runs"][name] = bench_train.run_child(run_args, case, trainer, timeout=args.run_timeout)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as stopped:
            # what it got to is kept, and the next runs still get their turn (--resume tries it again);
            # a failed run's traceback is in the log above
            why = ({"stopped_after_s": args.run_timeout} if isinstance(stopped, subprocess.TimeoutExpired)
                   else {"failed_with_exit_status": stopped.returncode,
                         "after_s": round(time.perf_counter() - started, 1)})
            payload["unfinished"][name] = {**why, "command": command, **bench_train.progress(case, trainer, began)}
            out.write_text(json.dumps(payload, indent=1) + "\n")
            print(f"{name}: unfinished: {json.dumps(payload['unfinished'][name])}", flush=True)
            continue
        payload["unfinished"].pop(name, None)
        payload["commands"][name] = command
        payload["cases"] = summarize(payload["runs"])
        out.write_text(json.dumps(payload, indent=1) + "\n")  # after every run: a cut-short run keeps its figures
        done = payload["runs"][name]
        steady = f"{done['steady_tokens_per_s']:.0f}" if done.get("steady_tokens_per_s") else "n/a"
        print(f"{name}: {done['tokens_per_s']:.0f} real tok/s ({steady} past the first {bench_train.WARM_UP_STEPS} "
              f"steps), accuracy {done['accuracy']:.4f}, {time.perf_counter() - started:.0f} s", flush=True)
    for case, c in payload["cases"].items():
        figures = {k: round(v, 3) for k, v in c.items() if isinstance(v, float)}
        print(f"{case}: {figures}; targets {c['targets']}")
    record.append("bench_gpu.py", argv, payload)
    print(f"wrote {out}")
    if payload["unfinished"]:
        print(f"unfinished: {', '.join(payload['unfinished'])} (--resume runs them again)", flush=True)
    return payload


if __name__ == "__main__":
    sys.exit(1 if main()["unfinished"] else 0)
