"""Mutation check: every rule this project promises is broken on purpose, one at a time, in a copy of
the project, and the fast tests that guard it must then fail. A mutant that survives names a rule no
test holds: the test that should have caught it is missing or cannot fail.

    make mutants                          # every mutant, about 11 minutes on 2 cores (BENCHMARKS.md)
    python tests/mutants.py ties_count_as_right double_bos   # some of them

Prints CAUGHT (and the first failing test) or SURVIVED for each; exits 1 if any survived.
tests/test_mutants.py checks, in the fast tier, that each mutant still applies to the code as it is
and names test files that exist, so the list cannot rot unseen.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the project root
    old: str  # found exactly once in `file`
    new: str
    tests: tuple[str, ...]  # the fast-tier test files that must catch it


MUTANTS = (
    # the checklist: ties, one score, pooling, BOS and EOS, rows set aside
    Mutant("ties_count_as_right", "rm_lib/evaluation/metrics.py", "wins = [c > r for", "wins = [c >= r for",
           ("tests/test_model.py",)),
    Mutant("no_tie_rate", "rm_lib/evaluation/metrics.py", "ties = [c == r for", "ties = [c != c for",
           ("tests/test_model.py",)),
    Mutant("score_ties_as_wins", "rm_lib/steps/score.py", '"chosen_wins": c > rj,', '"chosen_wins": c >= rj,',
           ("tests/test_scoring.py",)),
    Mutant("two_outputs", "rm_lib/model/modeling.py", "    config.num_labels = 1\n", "    config.num_labels = 2\n",
           ("tests/test_model.py",)),
    Mutant("pool_the_last_column", "rm_lib/model/modeling.py",
           "return (positions * attention_mask.to(positions.dtype)).argmax(-1)",
           "return positions[-1].expand(attention_mask.shape[:-1])", ("tests/test_model.py",)),
    Mutant("double_bos", "rm_lib/model/special.py", "if n and tuple(ids[:n]) != special.prefix:", "if n:",
           ("tests/test_tokenize_filter.py",)),
    Mutant("double_eos", "rm_lib/model/special.py",
           "if special.end is not None and (not ids or ids[-1] != special.end):", "if special.end is not None:",
           ("tests/test_tokenize_filter.py",)),
    Mutant("identical_pairs_dropped_unseen", "rm_lib/data/length_filter.py",
           '            outcome.dropped.append(_dropped(row, "identical_tokens"))\n            continue',
           "            continue", ("tests/test_tokenize_filter.py",)),
    Mutant("max_length_one_past", "rm_lib/data/length_filter.py",
           'len(row["input_ids_chosen"]) > max_len, len(row["input_ids_rejected"]) > max_len',
           'len(row["input_ids_chosen"]) > max_len + 1, len(row["input_ids_rejected"]) > max_len + 1',
           ("tests/test_tokenize_filter.py",)),
    Mutant("max_prompt_one_past", "rm_lib/data/length_filter.py", '(row.get("prompt_length") or 0) > max_prompt',
           '(row.get("prompt_length") or 0) > max_prompt + 1', ("tests/test_tokenize_filter.py",)),
    Mutant("cut_keeps_the_start", "rm_lib/data/length_filter.py", "    return front + body[-room:]",
           "    return front + body[:room]", ("tests/test_tokenize_filter.py",)),
    Mutant("cut_loses_the_template_bos", "rm_lib/data/length_filter.py",
           "    return keep_front or int(template_start is not None and ids[:1] == [template_start])",
           "    return keep_front", ("tests/test_tokenize_filter.py",)),
    Mutant("dropped_rows_not_written", "rm_lib/steps/filter.py",
           'write_jsonl(out / "dropped.jsonl", all_dropped)', 'write_jsonl(out / "dropped.jsonl", all_dropped[:1])',
           ("tests/test_tokenize_filter.py",)),
    Mutant("rows_against_their_scores_kept_unnamed", "rm_lib/data/formats.py", 'raise Rejected("scores_against_label",',
           'raise Rejected("tied_scores",', ("tests/test_formats.py",)),
    # the loss, and what evaluation reports of it
    Mutant("margin_added", "rm_lib/model/loss.py", "diff = diff - margin", "diff = diff + margin",
           ("tests/test_model.py",)),
    Mutant("centering_ignored", "rm_lib/model/loss.py", "loss = loss + center_rewards_coefficient",
           "loss = loss + 0 * center_rewards_coefficient", ("tests/test_model.py",)),
    Mutant("held_out_loss_of_the_wrong_sign", "rm_lib/evaluation/metrics.py",
           "math.log1p(math.exp(-(c - r))) if c - r > -30", "math.log1p(math.exp(c - r)) if c - r > -30",
           ("tests/test_model.py",)),
    # each pair weighs alike in a step's gradient, however its forwards are split
    Mutant("forwards_weighed_alike_not_pairs", "rm_lib/model/batching.py",
           "mine = [Forward(chunk, len(chunk) * world / step_pairs) for chunk in shares[rank]]",
           "mine = [Forward(chunk, 1.0 / len(shares[rank])) for chunk in shares[rank]]", ("tests/test_train.py",)),
    Mutant("idle_forward_counted", "rm_lib/model/batching.py", "[Forward([spare], 0.0)]", "[Forward([spare], 1.0)]",
           ("tests/test_train.py",)),
    # padding-free and shared-prompt packing
    Mutant("rejected_positions_restart", "rm_lib/model/packing.py",
           "(i, chosen[k:], k),\n                                           (n + i, rejected[k:], k)",
           "(i, chosen[k:], k),\n                                           (n + i, rejected[k:], 0)",
           ("tests/test_packing.py",)),
    Mutant("rejected_blind_to_the_prompt", "rm_lib/model/packing.py",
           "        allowed |= prefix_ids[:, :, None] == segment_ids[:, None, :]\n    if causal:",
           "        pass\n    if causal:", ("tests/test_packing.py",)),
    Mutant("packed_not_causal", "rm_lib/model/packing.py",
           "        allowed &= torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()",
           "        allowed &= torch.ones(width, width, dtype=torch.bool, device=segment_ids.device)",
           ("tests/test_packing.py",)),
    # the split and the held-out pairs
    Mutant("test_prompts_in_train", "rm_lib/steps/download.py",
           'return ({"train": [p for p, k in zip(pairs, prompts) if k not in test_keys],',
           'return ({"train": [p for p, k in zip(pairs, prompts)],', ("tests/test_download.py",)),
    Mutant("prompts_apart_by_case", "rm_lib/data/keys.py", 'unicodedata.normalize("NFKC", text).casefold())',
           'unicodedata.normalize("NFKC", text))', ("tests/test_download.py",)),
    Mutant("own_prompts_counted_as_a_bases", "rm_lib/data/trained_prompts.py",
           "by_base = [i for i, d in enumerate(digests) if d not in own and d in bases]",
           "by_base = [i for i, d in enumerate(digests) if d in bases]", ("tests/test_trained_prompts.py",)),
    # the release gate
    Mutant("minimum_not_enough", "rm_lib/evaluation/quality.py",
           "if not _finite(accuracy) or accuracy < min_accuracy:",
           "if not _finite(accuracy) or accuracy <= min_accuracy:", ("tests/test_release_gate.py",)),
    Mutant("nan_accuracy_passes", "rm_lib/evaluation/quality.py",
           "if not _finite(accuracy) or accuracy < min_accuracy:", "if accuracy < min_accuracy:",
           ("tests/test_release_gate.py",)),
    Mutant("chance_within_noise_passes", "rm_lib/evaluation/quality.py",
           "elif not reasons and min_accuracy > CHANCE and low <= CHANCE:", "elif False:",
           ("tests/test_release_gate.py",)),
    Mutant("length_baseline_tie_passes", "rm_lib/evaluation/quality.py", "    passed = accuracy > baseline\n",
           "    passed = accuracy >= baseline\n", ("tests/test_release_gate.py",)),
    Mutant("noise_bound_doubled", "rm_lib/evaluation/quality.py", "    if accuracy < previous - margin:",
           "    if accuracy < previous - 2 * margin:", ("tests/test_release_gate.py",)),
    Mutant("shared_test_pairs_not_strict", "rm_lib/evaluation/quality.py",
           "    if on_shared is None and (not known or shared >= SHARED_FOR_STRICT * larger):",
           "    if on_shared is None and not known:", ("tests/test_release_gate.py",)),
    Mutant("shared_outcomes_not_strict", "rm_lib/evaluation/quality.py",
           "    if both.pairs >= SHARED_FOR_STRICT * larger:  # nearly the same sample: a drop is a drop",
           "    if False:", ("tests/test_release_gate.py",)),
    Mutant("mcnemar_without_continuity", "rm_lib/evaluation/quality.py",
           "    bound = 1 + Z95 * math.sqrt(both.lost + both.gained)",
           "    bound = Z95 * math.sqrt(both.lost + both.gained)", ("tests/test_release_gate.py",)),
    Mutant("shared_pairs_ignored", "rm_lib/evaluation/quality.py",
           "    if both is not None and both.pairs >= min_test_pairs:", "    if False:",
           ("tests/test_release_gate.py",)),
    Mutant("bar_from_this_folder_not_the_hub", "rm_lib/steps/push.py",
           "verdicts = gate(params, layout, on_hub.folder if on_hub else None)",
           "verdicts = gate(params, layout, None)", ("tests/test_hub.py",)),
    Mutant("upload_past_a_newer_revision", "rm_lib/steps/push.py", "parent_commit=on_hub.commit,",
           "parent_commit=None,", ("tests/test_hub.py",)),
    Mutant("private_release_into_a_public_repository", "rm_lib/steps/push.py",
           "    if private and on_hub.private is False:", "    if False:", ("tests/test_hub.py",)),
    Mutant("seen_by_base_share_loose", "rm_lib/evaluation/quality.py", "    if share > max_share + 1e-12:",
           "    if share > max_share + 0.05:", ("tests/test_trained_prompts.py",)),
)


def applies(mutant: Mutant, root: Path = ROOT) -> bool:
    return (root / mutant.file).read_text(encoding="utf-8").count(mutant.old) == 1


def _copy_project(target: Path) -> None:
    """The tracked files and the untracked ones git does not ignore: the code as the tests would see it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    shared = ROOT.parent / "shared"
    if shared.is_dir() and not (target.parent / "shared").exists():
        (target.parent / "shared").symlink_to(shared)  # the real data the tests read beside the project


def run(mutant: Mutant, copy: Path) -> tuple[bool, str]:
    """(caught, the first failing test or the summary line) for one mutant in the project copy."""
    path = copy / mutant.file
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace(mutant.old, mutant.new), encoding="utf-8")
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not integration and not slow",
                               "-p", "no:cacheprovider", "--tb=no", *mutant.tests], cwd=copy, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(copy)}, timeout=1800)
    finally:
        path.write_text(original, encoding="utf-8")
    lines = done.stdout.strip().splitlines()
    failed = next((line for line in lines if line.startswith("FAILED ")), lines[-1] if lines else "")
    return done.returncode != 0, failed


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTANTS}
    if unknown:
        print(f"no mutant named {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    stale = [m.name for m in chosen if not applies(m)]
    if stale:
        print(f"the code no longer holds what these mutants change: {', '.join(stale)} (tests/mutants.py)",
              file=sys.stderr)
        return 2
    survived = []
    with tempfile.TemporaryDirectory(prefix="rm-mutants-") as scratch:
        copy = Path(scratch) / "project"
        _copy_project(copy)
        for mutant in chosen:
            start = time.monotonic()
            caught, line = run(mutant, copy)
            print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {mutant.name} ({time.monotonic() - start:.0f} s): {line}",
                  flush=True)
            if not caught:
                survived.append(mutant.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants caught"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
