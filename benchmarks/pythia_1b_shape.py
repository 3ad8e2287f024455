"""A Pythia-1B-shaped model (GPT-NeoX configuration, random weights) for the GPU benchmark: speed and
memory do not depend on the weights, and nothing has to be downloaded.

    python benchmarks/pythia_1b_shape.py benchmarks/.work/pythia-1b-shape
    python benchmarks/bench_train.py --model benchmarks/.work/pythia-1b-shape --max-length 1024
    python benchmarks/pythia_1b_shape.py --small benchmarks/.work/small-decoder   # CPU size
    python benchmarks/pythia_1b_shape.py --tokenizer-only benchmarks/.work/tokenizer  # 1 MB to carry along

The tokenizer is the offline all-MiniLM-L6-v2 one (its ids fit the 50,304-entry vocabulary) unless
--tokenizer names another, e.g. EleutherAI/pythia-1b where the Hub is reachable. On a machine that
has neither the Hub nor that package, pass a folder that --tokenizer-only wrote elsewhere.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def config(tokenizer, small: bool = False):
    """The GPT-NeoX configuration: Pythia-1B's shape, or with `small` the same family at CPU size (4
    layers of 256)."""
    from transformers import GPTNeoXConfig

    size = (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024) if small
            else dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192))
    return GPTNeoXConfig(vocab_size=50304, **size, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True, tie_word_embeddings=False, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)


def is_built(folder: Path) -> bool:
    """A shape `build` wrote there, whose tokenizer reads the shape's positions: one built before that limit
    was set says all-MiniLM's 512, and a max length of 1024 is refused against it; it is built again."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return tokenizer.get("model_max_length", 0) >= config.get("max_position_embeddings", 0)


def build(folder: Path, tokenizer_name: str, small: bool = False, weights: bool = True) -> Path:
    """The model (random weights) and its tokenizer in `folder`; without `weights`, the configuration
    and tokenizer alone (what planning a run needs, not 4 GB of weights)."""
    import torch
    from transformers import GPTNeoXForSequenceClassification

    from rm_lib.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    shape = config(tokenizer, small)
    # the tokenizer's own limit is its first model's (all-MiniLM-L6-v2: 512 positions); this model reads 2,048,
    # and the benchmark's max length 1024 must not be refused against the other model's limit
    tokenizer.model_max_length = shape.max_position_embeddings
    if weights:
        torch.manual_seed(0)
        GPTNeoXForSequenceClassification(shape).save_pretrained(folder, safe_serialization=True)
    else:
        shape.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokenizer", default="default")
    parser.add_argument("--small", action="store_true", help="4 layers of 256: a decoder for CPU benchmarks")
    parser.add_argument("--tokenizer-only", action="store_true", help="write the tokenizer alone (no model)")
    args = parser.parse_args()
    if args.tokenizer_only:
        from rm_lib.model.modeling import load_tokenizer

        load_tokenizer(args.tokenizer).save_pretrained(args.folder)
        print(args.folder)
        return
    print(build(args.folder, args.tokenizer, args.small))


if __name__ == "__main__":
    main()
