"""On a GPU: the flex_attention path gives the rewards, loss and gradients of padded batches.

flex_attention has no backward on a CPU, so the tests check its forward there and this script checks
the gradients where training uses them: a decoder of the Pythia family at CPU size, fp32, pairs that
share prompts, scored (1) as a padded batch with SDPA, (2) packed one sequence after another in one
row with the flex block mask, (3) packed prompt | chosen | rejected (shared prompts), (4) the same
with each transformer layer compiled (`train.compile`).

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


def compare(model, rows: list[dict], pad: int, attention: str, tolerance: float = 2e-3) -> dict:
    """The rewards, loss and gradients of `rows` (pairs that share prompts) packed one sequence after
    another and packed prompt | chosen | rejected, with `attention`, against the same pairs as a padded
    batch with SDPA; on the model's device."""

    import contextlib

    from rm_lib.model.batching import collate_pairs
    from rm_lib.model.loss import bradley_terry_loss
    from rm_lib.model.modeling import rewards, unwrap
    from rm_lib.model.packing import any_width_compiles, pack_pairs, pack_pairs_shared, packed_rewards
    from rm_lib.training.trainer import compiled_layers

    device = next(model.parameters()).device
    n = len(rows)

    def step(compute):
        model.zero_grad(set_to_none=True)
        scores = compute()
        loss = bradley_terry_loss(scores[:n], scores[n:])
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        return scores.detach(), loss.detach(), grads

    model.train()
    model.set_attn_implementation("sdpa")
    padded = collate_pairs(rows, pad).to(device)
    reference = step(lambda: rewards(model, padded.input_ids, padded.attention_mask))
    model.set_attn_implementation(attention)
    report = {}
    for name, packer, compiled in (("per-sequence", pack_pairs, False), ("shared-prompt", pack_pairs_shared, False),
                                   ("shared-prompt, compiled layers", pack_pairs_shared, True)):
        batch = packer(rows, pad, one_row=True).to(device)
        with (compiled_layers(model) if compiled else contextlib.nullcontext()), \
                (any_width_compiles() if compiled else contextlib.nullcontext()):
            scores, loss, grads = step(lambda b=batch: packed_rewards(unwrap(model), b))
        worst, tensor = gradient_disagreement(reference[2], grads)
        report[name] = {"reward_max_abs_diff": float((scores - reference[0]).abs().max()),
                        "loss_abs_diff": float((loss - reference[1]).abs()), "grad_max_rel_diff": worst,
                        "grad_worst_tensor": tensor,
                        "tokens_computed": batch.real_tokens, "tokens_padded_batch": padded.padded_tokens}
        report[name]["ok"] = max(report[name]["reward_max_abs_diff"], report[name]["loss_abs_diff"], worst) <= tolerance
    return report


def check(tolerance: float = 2e-3, tokenizer_name: str = "default") -> dict:
    """On the GPU: the flex_attention path against padded batches, in fp32."""
    import pythia_1b_shape
    import torch

    from rm_lib.model.modeling import load_reward_model, load_tokenizer

    folder = WORK / "small-decoder"
    if not (folder / "config.json").exists():
        pythia_1b_shape.build(folder, tokenizer_name, small=True)
    tokenizer = load_tokenizer(str(folder))
    torch.manual_seed(0)
    model = load_reward_model(str(folder), pad_token_id=tokenizer.pad_token_id).cuda()
    return compare(model, pairs_with_prompts(16, 50_000), tokenizer.pad_token_id, "flex_attention", tolerance)


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
