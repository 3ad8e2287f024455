"""Definitions of your own, as `dg scaffold defs` lays them out (one module per asset, sensor or
component). orchestration/definitions.py loads this folder beside the reward-model pipeline, so a
file added here is in the code location without further wiring (docs/dagster.md)."""
