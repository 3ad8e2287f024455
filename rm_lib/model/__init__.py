"""The one-output reward model: loading, the Bradley-Terry loss, padding-free packing, scoring pairs."""
