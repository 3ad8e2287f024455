import json
import subprocess
import sys

import pytest

from helpers import run_steps, tiny_params, write_jsonl
from rm_lib.scoring import RewardScorer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    run_steps(tiny_params("train.max_steps=2"), root, "download", "tokenize", "filter", "train")
    return root


def test_score_api_pipeline_and_grpo_reward_function_agree(trained):
    from transformers import pipeline

    scorer = RewardScorer(trained / "models/reward_model")
    conversation = [{"role": "user", "content": "Tell me about the film."},
                    {"role": "assistant", "content": "The acting was wonderful."}]
    text = "User: Tell me about the film.\n\nAssistant: The acting was wonderful."
    by_messages, by_text = scorer.score([conversation, text])
    assert by_messages == pytest.approx(by_text, abs=1e-5)
    pipe = pipeline("text-classification", model=str(trained / "models/reward_model"), function_to_apply="none")
    assert pipe(text)[0]["score"] == pytest.approx(by_text, abs=1e-4)
    reward = scorer.reward_function()
    assert reward(prompts=[conversation[:1]], completions=[conversation[1:]]) == pytest.approx([by_messages], abs=1e-5)


def test_score_cli_writes_rewards_per_row(trained, tmp_path):
    rows = [{"prompt": "The film was", "chosen": "wonderful and brilliant.", "rejected": "awful and dreadful."},
            {"prompt": "The film was", "chosen": "same", "rejected": "same"}]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(trained), "score", "--input", str(src),
                          "--output", str(tmp_path / "scores.jsonl")], capture_output=True, text=True, check=True)
    assert "1 pairs (1 rejected), accuracy" in out.stdout and "longer wins" in out.stdout
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 1 and {"reward_chosen", "reward_rejected", "chosen_wins"} <= set(scored[0])
