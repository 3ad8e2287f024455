"""On a GPU: the flex_attention path gives the rewards, loss and gradients of padded batches.

flex_attention has no backward on a CPU, so the tests check its forward there and this script checks
the gradients where training uses them: a decoder of the Pythia family at CPU size, fp32, pairs that
share prompts, scored (1) as a padded batch with SDPA, (2) packed one sequence after another in one
row with the flex block mask, (3) packed prompt | chosen | rejected (shared prompts).

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


def check(tolerance: float = 2e-3, tokenizer_name: str = "default") -> dict:
    import pythia_1b_shape
    import torch

    from rm_lib.model.batching import collate_pairs
    from rm_lib.model.loss import bradley_terry_loss
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, rewards, unwrap
    from rm_lib.model.packing import pack_pairs, pack_pairs_shared, packed_rewards

    folder = WORK / "small-decoder"
    if not (folder / "config.json").exists():
        pythia_1b_shape.build(folder, tokenizer_name, small=True)
    tokenizer = load_tokenizer(str(folder))
    torch.manual_seed(0)
    model = load_reward_model(str(folder), pad_token_id=tokenizer.pad_token_id).cuda()
    model.train()
    rows = pairs_with_prompts(16, 50_000)
    n = len(rows)

    def step(compute):
        model.zero_grad(set_to_none=True)
        scores = compute()
        loss = bradley_terry_loss(scores[:n], scores[n:])
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        return scores.detach(), loss.detach(), grads

    pad = tokenizer.pad_token_id
    padded = collate_pairs(rows, pad).to(torch.device("cuda"))
    reference = step(lambda: rewards(model, padded.input_ids, padded.attention_mask))
    model.set_attn_implementation("flex_attention")
    report = {}
    for name, packer in (("per-sequence", pack_pairs), ("shared-prompt", pack_pairs_shared)):
        batch = packer(rows, pad, one_row=True).to(torch.device("cuda"))
        scores, loss, grads = step(lambda b=batch: packed_rewards(unwrap(model), b))
        worst = max(float((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                    for k, g in reference[2].items())
        report[name] = {"reward_max_abs_diff": float((scores - reference[0]).abs().max()),
                        "loss_abs_diff": float((loss - reference[1]).abs()), "grad_max_rel_diff": worst,
                        "tokens_computed": batch.real_tokens, "tokens_padded_batch": padded.padded_tokens}
        report[name]["ok"] = max(report[name]["reward_max_abs_diff"], report[name]["loss_abs_diff"], worst) <= tolerance
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
