"""How much of a preference set a reward uncorrelated with length can get right: the accuracy a
linear reward on frozen all-MiniLM-L6-v2 features reaches at each reward-length correlation.

Issue 15 asks a length-debiased model to beat "longer wins" on AlpacaEval at no more than half the
plain model's |reward-length r|. Fine-tuned runs (bench_quality.py) fall short; this measures whether
the encoder's features hold the signal at all, on the project's own split and tokens (the same
download -> tokenize -> filter as bench_quality.py, so the held-out pairs are the same):

- "content": a Bradley-Terry logistic regression on features from which the log token count has
  been regressed out (on the train sequences), so the reward is linearly uncorrelated with length
  there; its L2 strength is picked on held-back train prompts.
- "content + a * length": the same reward plus a multiple of the standardised log length, which
  buys accuracy with correlation; the curve says what accuracy each |r| can have.
- "features + length": a logistic regression on the features and the log length together (what a
  plain model could learn from the frozen features).

    python benchmarks/bench_length_frontier.py

prints a table and appends it (with the command) to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import record
from bench_quality import CASES, WORK, overrides

LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0)
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)


def prepare(args: argparse.Namespace):
    """The filtered train and test rows of the case, made by the project's own steps."""
    from rm_lib import steps
    from rm_lib.data.tokenstore import read_rows
    from rm_lib.layout import Layout
    from rm_lib.settings import load_params

    layout = Layout(WORK / f"{args.case}-frontier")
    params = load_params(None, overrides(args, args.case, False))
    for name in ("download", "tokenize", "filter"):
        print(steps.run(name, params, layout).summary(), flush=True)
    return read_rows(layout.filtered / "train.parquet"), read_rows(layout.filtered / "test.parquet")


def embed(sequences: list[tuple[int, ...]], batch: int = 32):
    """[n, 2h] CLS and mean-pooled last hidden states of the frozen base model, one row per sequence."""
    import torch
    from transformers import AutoModel

    from rm_lib.model.modeling import DEFAULT_MODEL, resolve_model_path

    model = AutoModel.from_pretrained(resolve_model_path(DEFAULT_MODEL), use_kernels=False).eval()
    out = torch.zeros(len(sequences), 2 * model.config.hidden_size)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # little padding per batch
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, :len(sequences[i])] = 1
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).float()
            out[idx] = torch.cat([hidden[:, 0], (hidden * weights).sum(1) / weights.sum(1)], dim=-1)
            if start // batch % 40 == 0:
                print(f"embedded {start + len(idx)}/{len(order)} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def fit_pairwise(diffs, lam: float):
    """w minimising mean softplus(-diffs @ w) + lam/2 |w|^2 (Bradley-Terry without a bias)."""
    import torch

    w = torch.zeros(diffs.shape[1], dtype=diffs.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(diffs @ w)).mean() + lam / 2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def residualise(features, log_len, fit_on):
    """features minus their least-squares fit on [1, log length] over the sequences `fit_on`."""
    import torch

    design = torch.stack([torch.ones_like(log_len), log_len], dim=1)
    beta = torch.linalg.lstsq(design[fit_on], features[fit_on]).solution
    return features - design @ beta


def main(argv: list[str] | None = None) -> None:
    import torch

    from rm_lib.evaluation.metrics import pair_metrics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="alpaca")
    parser.add_argument("--max-rows", type=int, default=4000, help="source rows read (alpaca has 20,000)")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    if not CASES[args.case].exists():
        sys.exit(f"{CASES[args.case]} is absent: the real preference data lives in ../shared/data beside the project")
    args.learning_rate = args.batch_size = args.length_debias_weight = None  # for bench_quality.overrides
    torch.manual_seed(0)
    train, test = prepare(args)

    index: dict[tuple[int, ...], int] = {}
    def ids(rows):
        return [(index.setdefault(tuple(r["input_ids_chosen"]), len(index)),
                 index.setdefault(tuple(r["input_ids_rejected"]), len(index))) for r in rows]
    train_pairs, test_pairs = torch.tensor(ids(train)), torch.tensor(ids(test))
    sequences = list(index)
    n_tokens = torch.tensor([len(s) for s in sequences], dtype=torch.float64)
    log_len = n_tokens.log()
    raw = embed(sequences).double()
    train_seqs = train_pairs.unique()
    features = (raw - raw[train_seqs].mean(0)) / (raw[train_seqs].std(0) + 1e-6)
    content = residualise(features, log_len, train_seqs)
    std_log_len = (log_len - log_len[train_seqs].mean()) / log_len[train_seqs].std()

    def diffs(f, pairs):
        return f[pairs[:, 0]] - f[pairs[:, 1]]

    # L2 strength: picked on a fifth of the train prompts held back, then refit on all train pairs.
    prompts = sorted({tuple(r["input_ids_chosen"][:r["prompt_length"]]) for r in train})
    held = set(random.Random(0).sample(prompts, len(prompts) // 5))
    is_held = torch.tensor([tuple(r["input_ids_chosen"][:r["prompt_length"]]) in held for r in train])
    def pick(f):
        scores = {}
        for lam in LAMBDAS:
            w = fit_pairwise(diffs(f, train_pairs[~is_held]), lam)
            scores[lam] = float((diffs(f, train_pairs[is_held]) @ w > 0).double().mean())
        lam = max(scores, key=scores.get)
        return lam, fit_pairwise(diffs(f, train_pairs), lam)

    def measure(name: str, reward, lam: float | None) -> dict:
        m = pair_metrics(reward[test_pairs[:, 0]].tolist(), reward[test_pairs[:, 1]].tolist(),
                         n_tokens[test_pairs[:, 0]].long().tolist(), n_tokens[test_pairs[:, 1]].long().tolist())
        return {"reward": name, "l2": lam, **{k: m[k] for k in ("accuracy", "longer_wins_baseline",
                                                                "prefers_longer", "reward_length_correlation")}}

    rows = []
    both = torch.cat([features, std_log_len[:, None]], dim=1)
    lam, w = pick(both)
    rows.append(measure("features + length", both @ w, lam))
    lam, w = pick(content)
    quality = content @ w
    quality = quality / quality[train_seqs].std()
    for alpha in ALPHAS:
        rows.append(measure("content" if alpha == 0 else f"content + {alpha} * length",
                            quality + alpha * std_log_len, lam))
    rows.append(measure("longer wins (token count)", n_tokens, None))

    print(f"\n{len(train_pairs)} train pairs, {len(test_pairs)} held-out pairs, {len(sequences)} sequences")
    print("| reward | accuracy | longer wins | prefers longer | reward-length r |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reward']} | {r['accuracy']:.4f} | {r['longer_wins_baseline']:.4f} | "
              f"{r['prefers_longer']:.4f} | {r['reward_length_correlation']:+.3f} |")
    record.append("bench_length_frontier.py", argv, {"case": args.case, "train_pairs": len(train_pairs),
                                                     "test_pairs": len(test_pairs), "runs": rows})


if __name__ == "__main__":
    main()
