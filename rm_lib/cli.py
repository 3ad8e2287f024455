"""`python -m rm_lib <step>`: read settings, run one step (or all), print a short summary.

User mistakes (bad settings, bad data) end with one paragraph and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rm_lib import steps
from rm_lib.errors import UserError
from rm_lib.evaluation.visualize import printable
from rm_lib.files import STORAGE_ERRORS, not_yours, unwritable_folder
from rm_lib.layout import Layout, project_above
from rm_lib.network import without_credentials
from rm_lib.pipeline.preflight import check_before
from rm_lib.settings import load_params, params_file
from rm_lib.steps import PIPELINE


def _common_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--params, --set and --root, read before the step name and (with `prefix` dests) after it.
    A subparser writes its own defaults over the main parser's values, hence the separate dests."""
    # metavars given: argparse would name them after the dests (STEP_PARAMS) in the help after a step
    parser.add_argument("--params", dest=prefix + "params", default=None, metavar="PARAMS",
                        help="settings file (default: the params.yaml of --root, else of the current folder)")
    parser.add_argument("--set", dest=prefix + "overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--root", dest=prefix + "root", default=None, metavar="ROOT",
                        help="project folder that holds data/ and models/ (default: the current folder)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rm_lib", description="Reward-model pipeline steps.")
    _common_options(parser)
    sub = parser.add_subparsers(dest="step", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        step_parser = sub.add_parser(name, help=help)
        _common_options(step_parser, prefix="step_")
        return step_parser

    for step in PIPELINE:
        add(step, f"run the {step} step")
    add("run", "run every step in order: " + " -> ".join(PIPELINE))
    score = add("score", "score every pair of a file with a trained model")
    score.add_argument("--model", default=None, help="model folder (default: models/reward_model)")
    score.add_argument("--input", required=True, help="preference file in any supported format")
    score.add_argument("--output", required=True, help="JSONL file of rewards per row")
    show = add("show-tokens", "print one tokenized example with every token visible")
    show.add_argument("--split", default="train", choices=("train", "test"), help="which split (default: train)")
    show.add_argument("--index", type=int, default=0, help="which example of the split, from 0 (default: 0)")
    show.add_argument("--stage", default="filtered", choices=("tokenized", "filtered"),
                      help="the ids as tokenize wrote them, or as filter kept them (default: filtered)")
    show.add_argument("--no-color", action="store_true", help="mark tokens without terminal colours")
    return parser


def _merge_common(args: argparse.Namespace) -> argparse.Namespace:
    """Options given after the step win over those before it; every --set applies, in order."""
    args.params = args.step_params or args.params
    args.root_given = (args.step_root or args.root) is not None
    args.root = args.step_root or args.root or "."
    args.overrides = args.overrides + args.step_overrides
    return args


def _not_below_a_project() -> None:
    """Run from a folder inside a project (data/, tests/), a step read no params.yaml, ran on the built-in
    settings and wrote a second data/ tree there: refused, saying where the project is."""
    above = project_above(Path.cwd())
    if above is not None:
        where = shlex.quote(str(above))
        raise UserError(f"the current folder holds no params.yaml and lies inside the project {above}: run from "
                        f"there (cd {where}) or pass --root {where}; --root . runs here, on the built-in settings")


def _run_step(step: str, params, layout: Layout) -> None:
    result = steps.run(step, params, layout)
    if steps.first_of_its_launch():  # under accelerate launch, one summary for all processes
        print(printable(result.summary()), flush=True)


def _show_tokens(args: argparse.Namespace, params, layout: Layout) -> None:
    from rm_lib.data.tokenstore import read_rows
    from rm_lib.evaluation.visualize import visualize_token
    from rm_lib.model.modeling import load_tokenizer
    from rm_lib.pipeline.chain import tokenizer_of_tokenized

    folder = layout.filtered if args.stage == "filtered" else layout.tokenized
    path = folder / f"{args.split}.parquet"
    if not path.is_file():
        step = "filter" if args.stage == "filtered" else "tokenize"
        raise UserError(f"{path}: not found; run the {step} step first (or pass --root of a project that has)")
    rows = read_rows(path)
    if not 0 <= args.index < len(rows):
        raise UserError(f"show-tokens --index {args.index}: the {args.stage} {args.split} split has {len(rows)} "
                        f"examples, numbered 0 to {len(rows) - 1}")
    row = rows[args.index]
    # the ids mean words of the tokenizer that made them, whatever model.name_or_path says now
    name, revision = tokenizer_of_tokenized(layout, params.model.name_or_path, params.model.revision)
    if (name, revision) != (params.model.name_or_path, params.model.revision):
        at = f" at revision {revision!r}" if revision is not None else ""
        print(f"show-tokens: decoded with the tokenizer of '{name}'{at}, which made these token ids "
              f"({layout.tokenized / 'manifest.json'}); model.name_or_path is '{params.model.name_or_path}'",
              file=sys.stderr)
    tokenizer = load_tokenizer(name, revision=revision)
    for side in ("chosen", "rejected"):
        print(f"{side} ({len(row[f'input_ids_{side}'])} tokens, prompt {row['prompt_length']}):")
        # colours for a terminal only: piped or written to a file, their codes would be noise
        print(visualize_token(row[f"input_ids_{side}"], tokenizer, color=not args.no_color and sys.stdout.isatty()))


def _given(overrides: list[str], key: str) -> bool:
    """Whether `--set key=...` is among this command's overrides."""
    return any(o.partition("=")[0].strip() == key for o in overrides)


def _runnable(program: str, absolute: bool = False) -> str:
    """How to run `program` from this shell: the one of this environment (make's .venv/bin/python, and the
    dvc it links there), as a path from the current folder (`absolute`: a whole path, for a command that
    changes folder first); a bare `python` is the system's, without the project's packages."""
    own = Path(sys.prefix) / "bin" / program
    if not own.exists():
        return program
    try:
        return shlex.quote(str(own if absolute else own.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(own))


def where_to_look(layout: Layout, *, demo: bool) -> str:
    """What `run` made and the next commands, printed at its end."""
    root = layout.root
    lines = ["", "Done. What the run made:",
             f"  model      {layout.model}  (load with transformers or rm_lib.evaluation.scoring.RewardScorer)",
             f"  report     {layout.evaluation / 'report.json'}  (accuracy beside the length baselines)",
             f"  pictures   {layout.evaluation}/*.png, {layout.train_logs / 'loss.png'}, "
             f"{layout.filtered / 'lengths.png'}",
             f"  release    {layout.release}  (model card + files, exactly what push uploads)",
             f"  set aside  {layout.pairs / 'rejects.jsonl'}, {layout.filtered / 'dropped.jsonl'}  (rows not used, "
             "with their reasons)"]
    if demo:
        lines.append("  This was demo data: the accuracy says the pipeline learns, not how good a model is.")
    elsewhere = root.resolve() != Path(".").resolve()
    # run from another folder: the commands name the project (make and dvc from inside it)
    python, dvc = _runnable("python", absolute=elsewhere), _runnable("dvc", absolute=elsewhere)
    at = f" --root {shlex.quote(str(root))}" if elsewhere else ""
    inside = f"cd {shlex.quote(str(root))} && " if elsewhere else ""
    lines += ["Next:",
              f"  real data  {python} -m rm_lib run{at} --set download.source=Anthropic/hh-rlhf  (or a local file)",
              f"  the UI     {inside}make ui, then open http://127.0.0.1:3000 and click Materialize all",
              f"  compare    {inside}{dvc} exp run -S train.learning_rate=1e-4 && {dvc} exp show"]
    if elsewhere:
        lines.append(f"  (paths are inside {root})")
    return "\n".join(lines)


def _refused_path(exc: OSError, root: str) -> str | None:
    """The path an OSError is about: of a copy that ran out of room, where it was going (filename2), not
    what it read; for a storage failure that names no file, where it may have been."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) and exc.filename2 is not None:
        return str(exc.filename2)
    if exc.filename is not None:
        return str(exc.filename)
    if exc.errno in STORAGE_ERRORS:
        # the steps' own outputs are named (rm_lib.files): this is a write elsewhere, or in the project
        return (f"a write that named no file (the project folder {root}, a cache such as ~/.cache, or "
                f"{tempfile.gettempdir()})")
    return None


def _peer_stopped(exc: RuntimeError) -> str | None:
    """Under a launch of several processes, a collective that failed because another process ended (its
    own error line says why): one line instead of this process's traceback, which buried that line.
    None for any other RuntimeError."""
    if steps.launched_processes() == 1 or "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    text = str(exc)
    if not (isinstance(exc, dist.DistError) or "remote worker" in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = first.split("] ", 1)[1] if first.startswith("[") and "] " in first else first  # gloo's source line
    if len(first) > 160:  # to the end of a sentence
        first = first[:first.rfind(". ", 0, 160) + 1] if ". " in first[:160] else first[:160] + "..."
    return (f"process {os.environ.get('RANK', '?')} of the launch stopped at a collective, most often because "
            f"another process ended first (its own line says why); torch said: {first}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler or systemd stopping the job) stops a step as Ctrl-C does: the same clean-up,
    and one line saying what was left, where it ended without a word (exit 143)."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Only in a process of its own (a launch's processes are stopped by their launcher, which says why) and
    where nobody set another handler."""
    if threading.current_thread() is not threading.main_thread() or steps.launched_processes() > 1 \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(_number: int, _frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    with _sigterm_as_interrupt():
        try:
            return _main(argv)
        finally:
            steps.leave_the_launch()


def _main(argv: list[str] | None) -> int:
    args = _merge_common(_parser().parse_args(argv))
    running = args.step  # the step a stop interrupts (of `run`, the one it had got to)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        overrides = args.overrides
        if args.step == "score" and _given(overrides, "filter.max_token_length") \
                and not _given(overrides, "filter.max_prompt_token_length"):
            # score holds prompts to the model's recorded limit, not params.yaml's (checked below this length)
            overrides = [*overrides, "filter.max_prompt_token_length=null"]
        writes = args.step in PIPELINE or args.step == "run"  # score and show-tokens read, and write where told
        if writes and not args.root_given and args.params is None and not Path("params.yaml").is_file():
            _not_below_a_project()
        params = load_params(params_file(args.params, args.root), overrides)  # every section checked before any work
        problem = unwritable_folder(args.root, probe=False)  # a read-only project still serves score and show-tokens
        if problem:
            raise UserError(f"--root {args.root}: not a project folder: {problem}")
        layout = Layout(Path(args.root))
        if args.step in PIPELINE or args.step == "run":  # a mistake in a later step's settings: before any work
            check_before(PIPELINE if args.step == "run" else (args.step,), params)
        if args.step == "run":
            for step in PIPELINE:
                running = step
                _run_step(step, params, layout)
            if steps.first_of_its_launch():
                print(where_to_look(layout, demo=params.download.source == "demo"), flush=True)
        elif args.step == "score":
            from rm_lib.data.length_filter import LENGTH_SETTINGS
            from rm_lib.steps import score

            # the filter settings set on this command; the others are the model's own (its rm_lib.json)
            chosen = tuple(k for k in LENGTH_SETTINGS if _given(args.overrides, f"filter.{k}"))
            scored = steps.on_the_first_process("score", lambda: score.run_file(
                params, layout, model=args.model, input_path=args.input, output_path=args.output, chosen=chosen))
            if steps.first_of_its_launch():
                print(printable(scored.summary()))
        elif args.step == "show-tokens":
            _show_tokens(args, params, layout)
        else:
            _run_step(args.step, params, layout)
    except steps.FailedOnTheFirstProcess:
        # The first process fails the launch and says why; ended first, this one would have the launcher
        # stop the first before it said it.
        return 0
    except UserError as exc:
        if not exc.every_process or steps.first_of_its_launch():  # the same line from each process: once
            print(f"error: {printable(without_credentials(str(exc)))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the system refuses (permissions, a full disk): the path and why, no traceback
        where = _refused_path(exc, args.root)
        if where is None:
            raise
        # another user's file or folder in a project a team shares: whose, and the mend
        why = not_yours(where) if exc.errno in (errno.EACCES, errno.EPERM) else None
        print(f"error: {where}: {exc.strerror}" + (f": {why}" if why else ""), file=sys.stderr)
        return 2
    except RuntimeError as exc:
        said = _peer_stopped(exc)
        if said is None:
            raise
        print(f"error: {printable(said)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: what the user asked for, not a failure to explain with a traceback
        terminated = isinstance(exc, Terminated)
        done = PIPELINE[:PIPELINE.index(running)] if args.step == "run" and running in PIPELINE else ()
        said = (f"{running} stopped" + (" and left its earlier output as it was" if running != "show-tokens" else "")
                + ("; train resumes from its last checkpoint when run again" if running == "train" else "")
                + (f" ({', '.join(done)} had finished and replaced theirs)" if done else ""))
        print(f"interrupted{' by SIGTERM' if terminated else ''}: {said}", file=sys.stderr)
        return 143 if terminated else 130
    return 0
