"""What ties the steps together: input lineage, one run per step, the code a step runs, DVC."""
