"""On a GPU: the packed paths give the rewards, loss and gradients of padded batches.

flex_attention has no backward on a CPU and FlashAttention's variable-length kernel runs on a GPU
only, so the tests check the layouts there and this script checks the kernels where training uses
them: a decoder of the Pythia family at CPU size, pairs that share prompts, scored (1) as a padded
batch with SDPA, (2) packed one sequence after another in one row, (3) packed prompt | chosen |
rejected (shared prompts), (4) the same with each transformer layer compiled (`train.compile`).
flex_attention runs them in fp32; varlen (`train.attention=varlen`) runs (2)-(4) under fp16
autocast, against a padded batch under the same autocast: the kernel computes in bf16 or fp16 only,
the same way in both, and fp16 rounds 8 times finer than bf16, so the check can be tight.

    python benchmarks/gpu_check.py          # exit status 1 when a path disagrees
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

WORK = Path(os.environ.get("RM_BENCH_WORK") or Path(__file__).resolve().parent / ".work")


def pairs_with_prompts(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    seq = lambda lo, hi: [rng.randrange(5, vocab) for _ in range(rng.randrange(lo, hi))]  # noqa: E731
    rows = []
    for _ in range(n):
        prompt = seq(20, 300)
        rows.append({"input_ids_chosen": prompt + seq(1, 200), "input_ids_rejected": prompt + seq(1, 200),
                     "margin": None})
    return rows


# A tensor's error is measured against its own largest gradient, but never against less than this
# share of the largest gradient of any tensor: some gradients are zero by symmetry and hold only
# rounding noise (the final layer norm's bias, since a Bradley-Terry pair's two score gradients
# cancel), and noise over noise is no disagreement.
GRADIENT_FLOOR = 1e-3


def gradient_disagreement(reference: dict, other: dict) -> tuple[float, str]:
    """The worst relative error of `other`'s gradients against `reference`'s, and its tensor's name; a
    tensor with a gradient on one side only counts as wholly wrong."""
    scale = max(float(g.abs().max()) for g in reference.values())
    worst, name = 0.0, ""
    for key in sorted(set(reference) | set(other)):
        if key not in reference or key not in other:
            return float("inf"), key
        g = reference[key]
        error = float((other[key] - g).abs().max()) / max(float(g.abs().max()), GRADIENT_FLOOR * scale, 1e-30)
        if error > worst:
            worst, name = error, key
    return worst, name


# name, packer, compiled layers, the benchmark runs that time the path (None: every run, the default
# path's; a path that disagrees with padded batches leaves them out: they would time a model that
# trains wrong)
FLEX_PATHS = (("per-sequence", "pack_pairs", False, None), ("shared-prompt", "pack_pairs_shared", False, None),
              ("shared-prompt, compiled layers", "pack_pairs_shared", True, ["ours_compiled"]))
VARLEN_PATHS = (("varlen per-sequence (fp16)", "pack_pairs", False, ["ours_varlen"]),
                ("varlen shared-prompt (fp16)", "pack_pairs_shared", False, ["ours_varlen"]),
                ("varlen shared-prompt, compiled layers (fp16)", "pack_pairs_shared", True, []))
# under fp16 the padded batch and the packed one round differently: the worst tensor's gradient by
# 2-3% on this model; a causal mask aligned to the wrong end moves it by 200%
# (tests/test_varlen.py shows the check fails then)
FP16_TOLERANCE = 0.1


def compare(model, rows: list[dict], pad: int, attention: str, tolerance: float = 2e-3, *,
            paths: tuple = FLEX_PATHS, fp16: bool = False) -> dict:
    """The rewards, loss and gradients of `rows` (pairs that share prompts) on each of `paths` with
    `attention`, against the same pairs as a padded batch with SDPA; on the model's device, in fp32
    or under fp16 autocast. Rewards are compared relative to the largest reward (at least 1)."""

    import contextlib

    import torch

    from rm_lib.model import packing
    from rm_lib.model.batching import collate_pairs
    from rm_lib.model.loss import bradley_terry_loss
    from rm_lib.model.modeling import rewards, unwrap
    from rm_lib.model.packing import any_width_compiles, packed_rewards
    from rm_lib.training.model_modes import compiled_layers

    device = next(model.parameters()).device
    n = len(rows)
    precision = torch.autocast(device.type, dtype=torch.float16) if fp16 else contextlib.nullcontext()

    def step(compute):
        model.zero_grad(set_to_none=True)
        with precision:
            scores = compute()
            loss = bradley_terry_loss(scores[:n], scores[n:])
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        return scores.detach(), loss.detach(), grads

    model.train()
    model.set_attn_implementation("sdpa")
    padded = collate_pairs(rows, pad).to(device)
    reference = step(lambda: rewards(model, padded.input_ids, padded.attention_mask))
    scale = float(reference[0].abs().max())
    model.set_attn_implementation(attention)
    report = {}
    for name, packer, compiled, runs in paths:
        batch = getattr(packing, packer)(rows, pad, one_row=True).to(device)
        with (compiled_layers(model) if compiled else contextlib.nullcontext()), \
                (any_width_compiles() if compiled else contextlib.nullcontext()):
            scores, loss, grads = step(lambda b=batch: packed_rewards(unwrap(model), b))
        worst, tensor = gradient_disagreement(reference[2], grads)
        report[name] = {"reward_max_abs_diff": float((scores - reference[0]).abs().max()), "reward_scale": scale,
                        "loss_abs_diff": float((loss - reference[1]).abs()), "grad_max_rel_diff": worst,
                        "grad_worst_tensor": tensor,
                        "tokens_computed": batch.real_tokens, "tokens_padded_batch": padded.padded_tokens,
                        "runs": runs}
        errors = (report[name]["reward_max_abs_diff"] / max(scale, 1.0), report[name]["loss_abs_diff"], worst)
        report[name]["ok"] = max(errors) <= tolerance
    return report


def check(tolerance: float = 2e-3, tokenizer_name: str = "default") -> dict:
    """On the GPU: the flex_attention path against padded batches in fp32, varlen under fp16."""
    import pythia_1b_shape
    import torch

    from rm_lib.model.modeling import load_reward_model, load_tokenizer
    from rm_lib.model.varlen import VARLEN, cuda_kernel, register_varlen

    folder = WORK / "small-decoder"
    if not pythia_1b_shape.is_built(folder):
        pythia_1b_shape.build(folder, tokenizer_name, small=True)
    tokenizer = load_tokenizer(str(folder))
    torch.manual_seed(0)
    model = load_reward_model(str(folder), pad_token_id=tokenizer.pad_token_id).cuda()
    rows, pad = pairs_with_prompts(16, 50_000), tokenizer.pad_token_id
    report = compare(model, rows, pad, "flex_attention", tolerance)
    if cuda_kernel() is None:
        report["varlen"] = {"ok": False, "why": f"torch {torch.__version__} has no torch.nn.attention.varlen",
                            "runs": ["ours_varlen"]}
    else:
        register_varlen()
        report.update(compare(model, rows, pad, VARLEN, FP16_TOLERANCE, paths=VARLEN_PATHS, fp16=True))
    return report


def main() -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; the CPU tests check the flex_attention forward")
    report = check()
    print(json.dumps(report, indent=1))
    if not all(r["ok"] for r in report.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
