"""Reading sources, normalising rows to pairs, chat templates, token ids, the length policy."""
