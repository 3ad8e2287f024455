"""Reward-model training as a pipeline: data, templates, training, evaluation, scoring, publishing.

This package imports no Dagster; `orchestration/` builds on it.
"""
__version__ = "0.1.0"
