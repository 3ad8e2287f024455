"""`python -m rm_lib <step>`: read settings, run one step (or all), print a short summary.

User mistakes (bad settings, bad data) end with one paragraph and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .errors import UserError
from .layout import Layout
from .settings import load_params

PIPELINE = ("download", "tokenize", "filter", "train", "evaluate", "push")
NEEDS_BASE_MODEL = ("run", "tokenize", "train")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rm_lib", description="Reward-model pipeline steps.")
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--root", default=".", help="project folder that holds data/ and models/")
    sub = parser.add_subparsers(dest="step", required=True)
    for step in PIPELINE:
        sub.add_parser(step, help=f"run the {step} step")
    sub.add_parser("run", help="run every step in order: " + " -> ".join(PIPELINE))
    score = sub.add_parser("score", help="score every pair of a file with a trained model")
    score.add_argument("--model", default=None, help="model folder (default: models/reward_model)")
    score.add_argument("--input", required=True, help="preference file in any supported format")
    score.add_argument("--output", required=True, help="JSONL file of rewards per row")
    show = sub.add_parser("show-tokens", help="print one tokenized example with every token visible")
    show.add_argument("--split", default="train", choices=("train", "test"))
    show.add_argument("--index", type=int, default=0)
    show.add_argument("--stage", default="filtered", choices=("tokenized", "filtered"))
    show.add_argument("--no-color", action="store_true")
    return parser


def _run_step(step: str, params, layout: Layout) -> None:
    module = importlib.import_module(f"rm_lib.steps.{step}")
    result = module.run(params, layout)
    print(result.summary(), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        params = load_params(args.params, args.overrides)  # validates every section before any work
        layout = Layout(Path(args.root))
        if args.step in NEEDS_BASE_MODEL:  # a model that cannot be a reward model fails before any work
            from .modeling import load_model_config

            load_model_config(params.model.name_or_path, revision=params.model.revision,
                              trust_remote_code=params.model.trust_remote_code)
        if args.step == "run":
            for step in PIPELINE:
                _run_step(step, params, layout)
        elif args.step == "score":
            from .steps import score

            print(score.run_file(params, layout, model=args.model, input_path=args.input,
                                 output_path=args.output).summary())
        elif args.step == "show-tokens":
            from .modeling import load_tokenizer
            from .tokenstore import read_rows
            from .visualize import visualize_token

            folder = layout.filtered if args.stage == "filtered" else layout.tokenized
            row = read_rows(folder / f"{args.split}.parquet")[args.index]
            tokenizer = load_tokenizer(params.model.name_or_path, revision=params.model.revision)
            for side in ("chosen", "rejected"):
                print(f"{side} ({len(row[f'input_ids_{side}'])} tokens, prompt {row['prompt_length']}):")
                print(visualize_token(row[f"input_ids_{side}"], tokenizer, color=not args.no_color))
        else:
            _run_step(args.step, params, layout)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
