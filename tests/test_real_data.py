"""The default model learns real preferences: held-out HH-RLHF accuracy above both length baselines.
(A module of its own: the integration tier runs modules side by side, and this one takes minutes.)"""
import json

import pytest

from conftest import HH, need
from helpers import run_steps, tiny_params


@pytest.mark.slow
def test_default_model_beats_the_length_baseline_on_real_hh_rlhf(tmp_path):
    """Done-when of the training issue: a seeded 80/20 split of HH-RLHF harmless; the default model
    must beat 'shorter wins' (55.6% on the whole file) on the held-out 20%."""
    need(HH)
    # Truncation keeps the end of each conversation, where the two replies differ, and bounds CI time.
    params = tiny_params(f"download.source={HH}", "download.max_rows=1200", "filter.max_token_length=96",
                         "filter.max_prompt_token_length=72",
                         "filter.policy=truncate",
                         "train.max_steps=null", "train.num_epochs=1", "train.batch_size=16",
                         "train.learning_rate=5e-5", "train.logging_steps=20", "train.save_steps=1000",
                         "evaluate.batch_size=64")
    res = run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    m = res["evaluate"].metrics
    print(json.dumps({k: v for k, v in m.items() if k != "per_length_bucket"}, indent=1))
    assert m["accuracy"] > max(0.556, m["shorter_wins_baseline"], m["longer_wins_baseline"])
