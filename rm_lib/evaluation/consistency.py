"""Score consistency: the same texts scored every way a trained model is used must get the same reward.

The reference is the evaluation's own path (padded batches of 32 pairs, right padding). Compared with it:
the same at batch size 1, a left-padded batch, the packed forward that training runs, the packed forward
with each pair's shared prompt computed once (train.shared_prompt, causal decoders), and
`transformers.pipeline("text-classification")` on the decoded text in batches of 8, the way a user of the
released model scores it. A path that disagrees usually means the score is read at the wrong token (a pad,
or the token before an EOS that doubles as pad) or that positions move with the padding.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rm_lib.model.inference import PairScorer, score_pairs
from rm_lib.model.modeling import TRAINED, is_last_token_pooled, load_reward_model, load_tokenizer, rewards, unwrap
from rm_lib.model.packing import pack_pairs, pack_pairs_shared, pooling, why_not_packed, window_too_short

REFERENCE = "right-padded batches of 64 texts (32 pairs) of like lengths"
PATHS = ("padded_bs1", "left_padding", "packed_training_forward", "packed_shared_prompt", "pipeline")
RULE = "|score - reference| <= tolerance * max(1, |reference|)"


def default_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """How far two correct paths may differ. The paths run the same weights on differently shaped batches,
    so they differ only by float rounding: float32 on CPU agrees to about 1e-6, so 1e-4 leaves room and still
    catches a score read at a wrong token. An accelerator picks other kernels per batch shape (and may run
    matmuls in TF32): 1e-3. bfloat16 keeps 8 mantissa bits (rounding near 4e-3 per operation, summed over
    layers): 5e-2; float16 keeps 11: 1e-2."""
    if dtype == torch.bfloat16:
        return 5e-2
    if dtype == torch.float16:
        return 1e-2
    return 1e-4 if device.type == "cpu" else 1e-3


def _left_padded(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids, mask


def _text_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text itself (BOS, or [CLS] ... [SEP]): the pipeline adds them."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return full[:start], full[start + len(plain):]


def round_trip_text(tokenizer: Any, ids: list[int]) -> str | None:
    """The text whose tokenization (with the tokenizer's own special tokens, as the pipeline does) gives
    exactly `ids`, or None where no decoded text does. Special tokens the rows hold beyond the ones the
    tokenizer adds (EOS, template markers) are kept in the text, so they come back as the same ids."""
    prefix, suffix = _text_affixes(tokenizer)
    body = list(ids)
    if prefix and body[:len(prefix)] == prefix:
        body = body[len(prefix):]
    if suffix and body[len(body) - len(suffix):] == suffix:
        body = body[:len(body) - len(suffix)]
    text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text if tokenizer(text, add_special_tokens=True)["input_ids"] == list(ids) else None


PIPELINE_BATCH = 8  # batches of texts of several lengths: the pipeline pads them with the tokenizer's pad token


def _pipeline_scores(model_dir: Path, texts: list[str], device: torch.device) -> list[float]:
    from transformers import pipeline

    from rm_lib.model.modeling import quiet_transformers

    with quiet_transformers():  # a user's own load: its bars are noise in the evaluation's log
        pipe = pipeline("text-classification", model=str(model_dir), function_to_apply="none", device=device)
    out = pipe(texts, batch_size=PIPELINE_BATCH)
    return [float((o[0] if isinstance(o, list) else o)["score"]) for o in out]


def _packed_scores(model: Any, rows: list[dict], pad_token_id: int, device: torch.device) -> list[float]:
    """The training forward: PairScorer on a packed batch, as `fit` runs it with train.padding_free."""
    return PairScorer(model)(pack_pairs(rows, pad_token_id, use_margin=False).to(device)).tolist()


def _pad_hint(model: Any, tokenizer: Any, seqs: list[list[int]]) -> str | None:
    """Why a pipeline score would differ: transformers' decoder heads read the last token that is not
    config.pad_token_id, so with pad == the token every text ends with they read the one before it, and
    with a config pad other than the tokenizer's they read the padding of a batch."""
    pad = getattr(unwrap(model).config, "pad_token_id", None)
    if pad is None or not is_last_token_pooled(model):
        return None
    if any(s and s[-1] == pad for s in seqs):
        return (f"config.pad_token_id ({pad}) is the last token of the texts (EOS used as pad): transformers' "
                "sequence-classification head reads the last token that is not pad, the one before the token "
                "training scored; give the model a pad token of its own")
    if tokenizer.pad_token_id != pad:
        return (f"the tokenizer pads with token {tokenizer.pad_token_id} but config.pad_token_id is {pad}: "
                "transformers' sequence-classification head reads the padding of a batch as text; make them one")
    return None


def _model_paths(model: Any, rows: list[dict], pad_token_id: int, skipped: dict) -> dict[str, list[float]]:
    """Scores of every text (chosen of each pair, then rejected) by the paths that run `model` itself."""
    device = next(model.parameters()).device
    seqs = [r["input_ids_chosen"] for r in rows] + [r["input_ids_rejected"] for r in rows]
    alone = [rewards(model, torch.tensor([s], device=device), torch.ones(1, len(s), dtype=torch.long, device=device))
             .item() for s in seqs]  # batch size 1: each text alone, no padding
    scored = {"padded_bs1": alone}
    if is_last_token_pooled(model):
        ids, mask = _left_padded(seqs, pad_token_id)
        scored["left_padding"] = rewards(model, ids.to(device), mask.to(device)).tolist()
    else:  # an encoder reads position 0 ([CLS]): left padding (OpenRLHF's default) puts a pad there
        skipped["left_padding"] = {"texts": len(seqs), "pad_right": True,
                                   "reason": "the model reads its first token ([CLS]), which left padding makes a pad"}
    longest = max(map(len, seqs), default=0)
    window = window_too_short(unwrap(model).config, longest)
    if pooling(unwrap(model)) is not None and window is None:
        scored["packed_training_forward"] = _packed_scores(model, rows, pad_token_id, device)
        if pooling(unwrap(model)) == "last":  # train.shared_prompt: each pair's prompt computed once
            batch = pack_pairs_shared(rows, pad_token_id, use_margin=False).to(device)
            scored["packed_shared_prompt"] = PairScorer(model)(batch).tolist()
        else:
            skipped["packed_shared_prompt"] = {"texts": len(seqs), "reason": "an encoder's prompt would see both "
                                               "answers: training packs its sequences apart"}
    else:  # training refuses to pack such texts (packing.check_attention_window)
        why = (f"no packed forward for this model: {why_not_packed(unwrap(model))}" if pooling(unwrap(model)) is None
               else f"no packed forward: this model attends within a sliding window of {window} tokens, which packed "
                    f"batches do not apply, and a text has {longest}")
        skipped["packed_shared_prompt"] = {"texts": len(seqs), "reason": why}
        skipped["packed_training_forward"] = {"texts": len(seqs), "reason": f"{why}; training runs padded batches, "
                                              "which the reference is"}
    return scored


def _compare(reference: list[float], scored: dict[str, tuple[list[int], list[float]]], tol: float,
             result: dict) -> None:
    for path, (indices, values) in scored.items():
        diffs = [abs(v - reference[i]) for i, v in zip(indices, values)]
        finite = all(math.isfinite(d) for d in diffs)
        result["max_abs_diff"][path] = max(diffs) if finite else math.nan
        if not finite or any(d > tol * max(1.0, abs(reference[i])) for i, d in zip(indices, diffs)):
            result["failed"].append(path)
    result["passed"] = not result["failed"]


@torch.no_grad()
def check(model_dir: Path, rows: list[dict], *, pad_token_id: int, sample: int = 16,
          tolerance: float | None = None, model: Any = None, tokenizer: Any = None,
          pipeline: bool = True) -> dict:
    """Score the first `sample` pairs (both sides) every way and compare each path with the reference.
    `model`/`tokenizer`: already loaded ones of `model_dir` (else they are loaded, and the model is let go
    before the pipeline loads its own copy); `pipeline=False` leaves the transformers pipeline out."""
    rows = rows[:sample]
    tokenizer = tokenizer or load_tokenizer(str(model_dir), setting=TRAINED)
    own = model is None
    if own:
        model = load_reward_model(str(model_dir), trained=True, setting=TRAINED)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    tol = default_tolerance(dtype, device) if tolerance is None else tolerance
    seqs = [r["input_ids_chosen"] for r in rows] + [r["input_ids_rejected"] for r in rows]
    result: dict[str, Any] = {"pairs": len(rows), "texts": len(seqs), "tolerance": tol, "rule": RULE,
                              "dtype": str(dtype).removeprefix("torch."), "device": device.type,
                              "reference": REFERENCE, "max_abs_diff": dict.fromkeys(PATHS), "skipped": {},
                              "failed": [], "passed": True}
    if not rows:
        result["skipped"] = {path: {"texts": 0, "reason": "no pairs to score"} for path in PATHS}
        return result
    was_training = model.training
    model.eval()
    ref_c, ref_r = score_pairs(model, rows, pad_token_id=pad_token_id, batch_size=32)
    every = list(range(len(seqs)))
    scored = {path: (every, values) for path, values in
              _model_paths(model, rows, pad_token_id, result["skipped"]).items()}
    model.train(was_training)
    hint = _pad_hint(model, tokenizer, seqs)
    if own:
        del model, param  # the pipeline loads its own copy: never two in memory
    if pipeline:
        texts = [round_trip_text(tokenizer, s) for s in seqs]
        kept = [i for i, t in enumerate(texts) if t is not None]
        if len(kept) < len(seqs):
            result["skipped"]["pipeline"] = {"texts": len(seqs) - len(kept),
                                             "reason": "decoding and re-tokenizing does not give the same ids"}
        if kept:
            scored["pipeline"] = (kept, _pipeline_scores(model_dir, [texts[i] for i in kept], device))
    else:
        result["skipped"]["pipeline"] = {"texts": len(seqs), "reason": "not run"}
    _compare(ref_c + ref_r, scored, tol, result)
    hints = [hint] if hint and "pipeline" in result["failed"] else []
    if "left_padding" in result["failed"]:
        hints.append("a model whose positions are absolute (GPT-2) numbers them from the first column, padding "
                     "included: pad on the right, as the released tokenizer does")
    if hints:
        result["hint"] = "; ".join(hints)
    return result


def worst_difference(result: dict) -> float | None:
    """The largest difference of any path from the reference (None when no path ran; NaN where a path's
    scores were not finite)."""
    values = [v for v in (result.get("max_abs_diff") or {}).values() if isinstance(v, (int, float))]
    if any(math.isnan(v) for v in values):  # a path whose scores were not numbers: max() would drop it by order
        return math.nan
    return max(values) if values else None
