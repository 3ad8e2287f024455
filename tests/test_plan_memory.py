"""benchmarks/plan_memory.py: the forwards of a benchmark run and the peak GPU memory the device plan
predicts for them, worked out without a GPU or the model's weights."""
from __future__ import annotations

import sys

import pytest

from conftest import HH, ROOT, need

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_train  # noqa: E402
import plan_memory  # noqa: E402
import record  # noqa: E402


@pytest.fixture
def planned(tmp_path, monkeypatch):
    need(HH)
    import pythia_1b_shape

    monkeypatch.setattr(bench_train, "WORK", tmp_path / "work")
    monkeypatch.setenv("RM_BENCH_LOG", str(tmp_path / "results.jsonl"))
    model = pythia_1b_shape.build(tmp_path / "model", "default", small=True, weights=False)
    results = plan_memory.main(["--model", str(model), "--data", str(HH.parent), "--case", "hh", "--max-length", "256",
                                "--max-train-pairs", "48", "--batch-size", "4", "--batch-tokens", "2048"])
    return model, results


def test_the_plan_follows_the_trainer_batches_and_the_device_plan(planned):
    from rm_lib.data.tokenstore import read_rows
    from rm_lib.model.batching import epoch_batches
    from rm_lib.model.packing import FLEX_BLOCK, row_width, shared_prefix
    from rm_lib.training.device_plan import activation_bytes_per_token, state_bytes

    model, (by_pairs, by_tokens) = planned
    assert not (model / "model.safetensors").exists()  # the configuration alone
    assert by_pairs["batching"] == "4 pairs" and by_tokens["batching"] == "2048 tokens"
    assert by_pairs["steps"] == 12 and by_pairs["forwards"] == 12  # 48 pairs, one forward each under the budget
    rows = read_rows(bench_train.WORK / "hh" / "bench_train.parquet")
    computed = [sum(len(rows[i]["input_ids_chosen"]) + len(rows[i]["input_ids_rejected"])
                    - shared_prefix(rows[i]["input_ids_chosen"], rows[i]["input_ids_rejected"]) for i in batch)
                for batch in epoch_batches(rows, 4, seed=42, epoch=0, group_by_length=True)]
    assert by_pairs["max_tokens_per_forward"] == max(row_width([c], None, one_row=True) for c in computed)
    assert by_pairs["max_tokens_per_forward"] % FLEX_BLOCK == 0
    assert by_tokens["steps"] < by_pairs["steps"]  # short pairs come many to a batch
    shape = plan_memory.model_shape(model)
    assert shape.layers == 4 and shape.hidden == 256
    mib = 2**20
    assert by_pairs["predicted_peak_mib"] == pytest.approx(
        (state_bytes(shape) + by_pairs["max_tokens_per_forward"] * activation_bytes_per_token(shape, False)) / mib)
    assert by_pairs["state_mib"] < by_pairs["predicted_peak_checkpointing_mib"] < by_pairs["predicted_peak_mib"]
    # on the 80 GiB this small model has, the plan checkpoints nothing: it plans for the data's batches
    assert by_pairs["checkpointed_layers"] == 0 and by_pairs["planned_peak_mib"] == by_pairs["predicted_peak_mib"]
    assert by_pairs["max_tokens_per_forward"] <= by_pairs["planned_for_tokens"]
    assert record.results_path().exists() and record.results_path() != record.DEFAULT


def test_a_token_budget_per_forward_cuts_a_batch_into_several_forwards(planned):
    from rm_lib.data.tokenstore import read_rows

    rows = read_rows(bench_train.WORK / "hh" / "bench_train.parquet")
    whole = plan_memory.forward_widths(rows, batch_size=16, batch_tokens=None, seed=42, tokens_per_forward=None,
                                       pad_token_id=0, shared_prompt=True)
    cut = plan_memory.forward_widths(rows, batch_size=16, batch_tokens=None, seed=42, tokens_per_forward=512,
                                     pad_token_id=0, shared_prompt=True)
    assert len(cut) == len(whole) == 3
    assert all(len(step) == 1 for step in whole) and sum(map(len, cut)) > len(cut)
    assert max(w for step in cut for w in step) < max(w for step in whole for w in step)
