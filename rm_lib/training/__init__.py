"""The training loop, its memory policy and its tracker (W&B)."""
