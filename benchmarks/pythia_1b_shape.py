"""A Pythia-1B-shaped model (GPT-NeoX configuration, random weights) for the GPU benchmark: speed and
memory do not depend on the weights, and nothing has to be downloaded.

    python benchmarks/pythia_1b_shape.py benchmarks/.work/pythia-1b-shape
    python benchmarks/bench_train.py --model benchmarks/.work/pythia-1b-shape --max-length 1024

The tokenizer is the offline all-MiniLM-L6-v2 one (its ids fit the 50,304-entry vocabulary) unless
--tokenizer names another, e.g. EleutherAI/pythia-1b where the Hub is reachable.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def build(folder: Path, tokenizer_name: str) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    from rm_lib.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                           intermediate_size=8192, rotary_pct=0.25, max_position_embeddings=2048,
                           use_parallel_residual=True, tie_word_embeddings=False, num_labels=1,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokenizer", default="default")
    args = parser.parse_args()
    print(build(args.folder, args.tokenizer))


if __name__ == "__main__":
    main()
