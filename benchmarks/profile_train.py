"""Where a training step's time goes: our trainer on one case under torch.profiler, a few steps past
the warm-up, the device's time grouped by kind of work (attention, matrix products, the optimizer,
the rest) and the share of each step the device sat idle (the host's time: launches, packing, syncs).

    python benchmarks/profile_train.py --case hh --model benchmarks/.work/pythia-1b-shape --max-length 1024
    python benchmarks/profile_train.py --case hh ... --ours-setting=train.batch_tokens=16384

It takes bench_train.py's arguments (the same prepared data and settings), trains --wait + 1 +
--active steps of the same train step the benchmark runs, and writes the JSON (with the kernels that
took longest) to benchmarks/.work/profile-<case>.json unless --out names another file. On a CPU the
"device" is the CPU: its operators' own time, and no idle share.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import bench_train
import record

# Kinds of work, by the name of a GPU kernel (cuBLAS, CUTLASS, inductor's fused kernels) or of a CPU
# operator; checked in this order, the first that matches
KINDS = (("attention", re.compile(r"flex|attention|attn|fmha|flash|triton_tem", re.I)),  # inductor's templates: flex
         ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),  # the update, and clipping's norms
         ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|aten::(addmm|mm|bmm|matmul|linear)$", re.I)))


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if pattern.search(name):
            return label
    return "other"


def summarize(events: list[tuple[str, float]], step_walls: list[float], on_device: bool) -> dict:
    """`events`: (name, own microseconds) of every kernel (or CPU operator) in the profiled steps;
    the time per kind and its share, the longest twelve, and (on a device) how much of the steps'
    wall time the device was busy."""
    totals: dict[str, float] = {}
    for name, micros in events:
        totals[name] = totals.get(name, 0.0) + micros
    busy = sum(totals.values())
    by_kind: dict[str, float] = {label: 0.0 for label, _ in KINDS} | {"other": 0.0}
    for name, micros in totals.items():
        by_kind[kind(name)] += micros
    steps = len(step_walls)
    wall = sum(step_walls)
    result = {"steps": steps, "wall_ms_per_step": 1e3 * wall / max(steps, 1),
              "busy_ms_per_step": busy / 1e3 / max(steps, 1),
              "share": {k: v / busy if busy else 0.0 for k, v in by_kind.items()},
              "longest": [{"name": n[:160], "ms_per_step": t / 1e3 / max(steps, 1), "kind": kind(n)}
                          for n, t in sorted(totals.items(), key=lambda item: -item[1])[:12]]}
    if on_device:  # one stream: time no kernel ran is time the device waited on the host
        result["device_idle_share"] = max(0.0, 1 - busy / 1e6 / wall) if wall else None
    return result


def own_times(profile, on_device: bool) -> list[tuple[str, float]]:
    """(name, own microseconds) of the GPU kernels, or on a CPU of the CPU operators."""
    from torch.autograd import DeviceType

    found = []
    for event in profile.key_averages():
        if on_device and event.device_type == DeviceType.CUDA:
            found.append((event.key, float(event.self_device_time_total)))
        elif not on_device and event.device_type == DeviceType.CPU and event.key.startswith("aten::"):
            found.append((event.key, float(event.self_cpu_time_total)))
    return found


def profile(args: argparse.Namespace) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, schedule

    on_device = torch.cuda.is_available()
    case = args.case[0]
    work = bench_train.prepare(args, case)
    args.ours_setting = [*args.ours_setting, f"train.max_steps={args.wait + 1 + args.active}"]
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_device else [])]
    ends: list[float] = []  # perf_counter at the end of every optimizer step
    done: dict = {}

    def ready(prof) -> None:
        walls = [b - a for a, b in zip(ends[args.wait:], ends[args.wait + 1:])][:args.active]
        done.update(summarize(own_times(prof, on_device), walls, on_device))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))

    with torch.profiler.profile(activities=activities, on_trace_ready=ready,
                                schedule=schedule(wait=args.wait, warmup=1, active=args.active, repeat=1)) as prof:
        def stepped(optimizer, *_) -> None:
            if on_device:
                torch.cuda.synchronize()  # the step's kernels done: its wall time is the device's too
            ends.append(time.perf_counter())
            prof.step()

        handle = register_optimizer_step_post_hook(stepped)
        try:
            bench_train.train_ours(args, case, work)
        finally:
            handle.remove()
    return {"case": case, "device": torch.cuda.get_device_name() if on_device else "cpu",
            "settings": args.ours_setting, **done}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--wait", type=int, default=10, help="steps trained before profiling (compilation, warm-up)")
    parser.add_argument("--active", type=int, default=5, help="steps profiled")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace of the profiled steps")
    ours, rest = parser.parse_known_args(argv)
    args = bench_train.parse(rest)
    if not args.case or len(args.case) != 1:
        sys.exit("profile_train: name one --case")
    vars(args).update(vars(ours))
    bench_train.check_data(args, args.case)
    result = profile(args)
    out = args.out or bench_train.WORK / f"profile-{args.case[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    idle = result.get("device_idle_share")
    print(f"{result['steps']} steps: {result['wall_ms_per_step']:.1f} ms each, device busy "
          f"{result['busy_ms_per_step']:.1f} ms" + (f" (idle {idle:.0%})" if idle is not None else ""))
    print("  " + ", ".join(f"{k} {v:.0%}" for k, v in result["share"].items()))
    for row in result["longest"]:
        print(f"  {row['ms_per_step']:8.2f} ms  {row['kind']:<9} {row['name'][:100]}")
    record.append("profile_train.py", argv, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
