"""Every command of README.md's ```bash blocks runs, in README order, in a fresh project folder on tiny
settings, so the documentation cannot drift from the code. README.md is read at test time: a new
rm_lib command is run without touching this file; any other new command fails until it is run here or
listed in NOT_RUN with the reason it cannot run in a test."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import typing
from pathlib import Path

import yaml

from conftest import ROOT, SHARED_DATA, need

README = ROOT / "README.md"
RM_LIB_PREFIXES = ((".venv/bin/python", "-m", "rm_lib"), ("python", "-m", "rm_lib"), ("rm-lib",))

# Commands that cannot run inside a test, each with the reason and what covers it instead.
NOT_RUN = {
    "make run": "creates .venv and pip-installs the project (network); its pipeline is the `rm_lib run` command, "
                "run below on tiny settings",
    "make test": "runs the whole test suite, this test included",
    "python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128":
        "downloads a CUDA build of torch (network, GPU machines)",
    ".venv/bin/accelerate launch --multi_gpu --num_processes 2 -m rm_lib train":
        "starts two training processes; tests/test_train.py::test_two_processes_match_one_process_with_the_same_"
        "global_batch runs this launch on the CPU",
    ".venv/bin/accelerate launch --config_file configs/accelerate/fsdp.yaml -m rm_lib train":
        "FSDP over GPUs (use_cpu: false, bf16); needs two GPUs. tests/test_train.py::test_two_processes_train_as_"
        "one_through_uneven_shares_and_save_the_whole_model runs the trainer under this file's FSDP plugin on "
        "two CPU processes",
    "make test-integration": "runs the integration tier of the test suite, this test included",
    "make lint": "runs ruff; tests/test_lint.py runs the same check",
    "make mutants": "runs the fast tests once per mutant (about 15 minutes); tests/test_mutants.py checks that every "
                    "mutant still applies and catches one for real",
    "make ui": "starts the Dagster UI until stopped; tests/test_ui_browser.py starts it with the Makefile's own "
               "arguments and drives it in a browser",
    ".venv/bin/python -m rm_lib run --set download.source=Anthropic/hh-rlhf":
        "reads a Hub dataset (network); tests/test_download.py::test_hub_source_calls_datasets_load_dataset runs "
        "the same datasets.load_dataset path, and the local-file command above runs the whole pipeline",
    ".venv/bin/python -m rm_lib run --set download.source=trl-lib/ultrafeedback_binarized":
        "reads a Hub dataset (network); its format (conversational chosen/rejected with scores) is covered by "
        "tests/test_formats.py::test_conversational_implicit_and_explicit",
    ". .venv/bin/activate": "changes the calling shell only",
    "dvc repro": "tests/test_dvc.py runs it in a throw-away git + DVC repository (module fixture `pipeline`)",
    "dvc exp run -S train.learning_rate=1e-4": "tests/test_dvc.py::test_exp_run_and_exp_show",
    "dvc exp show --drop '^(rm_lib|data|models)/'": "tests/test_dvc.py::test_exp_run_and_exp_show (with the "
                                                    "Makefile's EXP_SHOW, which the test checks is this)",
    "git add dvc.lock params.yaml data/evaluation/metrics.json && git commit -m 'reward model: lr 1e-4'":
        "commits to the repository; tests/test_dvc.py commits dvc.lock the same way in its throw-away repository",
    "dvc push": "tests/test_dvc.py::test_a_teammate_clones_and_pulls_the_same_model_from_the_default_remote",
}

# rm_lib commands that run with extra settings appended, and why.
EXTRA = {
    "push": (["--set", "push.dry_run=true"], "push.repo_id would upload to the real Hub: a dry run writes "
                                              "data/release exactly as uploaded and uploads nothing"),
}

# Small settings for every step (tests/helpers.py tiny_params); the rest comes from the repo's params.yaml.
TINY = {
    "download": {"demo_pairs": 40, "max_rows": 40},
    # long enough that a few of the 40 hh-rlhf pairs in each split are kept
    "filter": {"max_token_length": 128, "max_prompt_token_length": 64},
    "train": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 2, "num_print_samples": 1},
    "evaluate": {"batch_size": 8},
    # a 4-step model may not pass the release gate: the gate has its own tests
    "push": {"min_accuracy": 0.0, "min_test_pairs": 1, "compare_with_release": False},
}


def readme_commands(text: str) -> list[str]:
    """Each command line of the ```bash blocks (continuations joined, comments dropped), normalised
    to single spaces."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words).replace("'&&'", "&&"))
    return commands


def rm_lib_argv(command: str) -> list[str] | None:
    words = shlex.split(command)
    for prefix in RM_LIB_PREFIXES:
        if tuple(words[:len(prefix)]) == prefix:
            return words[len(prefix):]
    return None


def test_readme_commands_are_parsed():
    text = "```bash\nmake run    # a comment\n.venv/bin/python -m rm_lib train \\\n  --set train.lora=true\n```\n"
    assert readme_commands(text) == ["make run", ".venv/bin/python -m rm_lib train --set train.lora=true"]
    assert rm_lib_argv(".venv/bin/python -m rm_lib score --input a.jsonl") == ["score", "--input", "a.jsonl"]
    assert rm_lib_argv("make run") is None


def _tiny_params_file(folder: Path) -> Path:
    from rm_lib.settings import Params

    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    hints = typing.get_type_hints(Params)
    for section, values in TINY.items():
        known = {f.name for f in dataclasses.fields(hints[section])}
        data[section].update({k: v for k, v in values.items() if k in known})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _local(argv: list[str]) -> list[str]:
    """README paths are relative to the repository; the shared data lives beside it."""
    return [a.replace("../shared/data", str(SHARED_DATA)) for a in argv]


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    from rm_lib.cli import main

    commands = readme_commands(README.read_text(encoding="utf-8"))
    if any("../shared/data" in c for c in commands):
        need(SHARED_DATA)
    project = tmp_path / "project"
    project.mkdir()
    _tiny_params_file(project)
    monkeypatch.chdir(project)
    ran, skipped, not_covered = [], [], []
    for command in commands:
        argv = rm_lib_argv(command)
        if command in NOT_RUN:
            skipped.append(command)
            continue
        if argv is None:
            not_covered.append(command)
            continue
        argv = _local(argv) + (EXTRA[argv[0]][0] if argv and argv[0] in EXTRA else [])
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"README command failed: {command}\n{captured.out}\n{captured.err}"
        ran.append((command, captured.out))
    assert not not_covered, (f"README commands neither run by this test nor listed in NOT_RUN with a reason: "
                             f"{not_covered}")
    steps = [rm_lib_argv(c)[0] for c, _ in ran]
    assert {"download", "train", "score", "run"} <= set(steps), steps  # the README's walk-through was found
    assert (project / "models/reward_model/model.safetensors").is_file()
    assert (project / "data/release/README.md").is_file()
    scored = [json.loads(line) for line in (project / "data/scores.jsonl").read_text().splitlines()]
    assert scored and {"reward_chosen", "reward_rejected", "chosen_wins"} <= set(scored[0])
    for code in re.findall(r"^```python[ \t]*\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S):
        exec(compile(code, "README.md (python block)", "exec"), {})  # e.g. the RewardScorer example


def test_not_run_commands_name_existing_make_targets_and_configs():
    """What NOT_RUN lists still exists: the make targets in the Makefile, the accelerate configs."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for command in NOT_RUN:
        words = shlex.split(command)
        if words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), command
        if "--config_file" in words:
            assert (ROOT / words[words.index("--config_file") + 1]).is_file(), command


def test_every_test_the_docs_name_exists():
    """docs/reliability.md and the other pages cite tests as proof of a promise: each must be a real one."""
    import re

    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]
    cited = set()
    for page in pages:
        text = page.read_text(encoding="utf-8")
        cited |= {(page.name, name) for name in re.findall(r"::(test_[a-z0-9_]+)", text)}
        # reliability.md's tables name their tests in the last column, also without the file
        last_cells = [line.rstrip(" |").rsplit("|", 1)[-1] for line in text.splitlines() if line.startswith("|")]
        cited |= {(page.name, name) for cell in last_cells for name in re.findall(r"`(test_[a-z0-9_]+)`", cell)}
    missing = sorted((page, name) for page, name in cited if f"def {name}(" not in tests)
    assert cited and not missing, missing


def test_the_set_up_asks_pytorchs_cpu_index_once_and_goes_on_without_it_when_it_does_not_answer(tmp_path):
    """pip retries an index it cannot reach five times for torch and each of its dependencies (a minute
    and more where only a mirror answers): the set-up asks once (configs/index_answers.py) and leaves out
    an index that cannot be reached or fails, never one that answers otherwise (a login, a page not found:
    pip knows its own credentials)."""
    import http.server
    import subprocess
    import sys
    import threading

    class Index(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            codes = {"/login/torch/": 401, "/broken/torch/": 503}
            if self.path in codes:
                self.send_error(codes[self.path])
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    (tmp_path / "index/torch").mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Index(*a, directory=str(tmp_path / "index")))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def answers(index: str) -> bool:
        done = subprocess.run([sys.executable, "configs/index_answers.py", index], cwd=ROOT, timeout=60)
        return done.returncode == 0

    try:
        here = f"http://127.0.0.1:{server.server_address[1]}"
        for index in (here, here + "/", here + "/missing", here + "/login", "file:///any/local/index", "/srv/wheels"):
            assert answers(index), index
        for index in (here + "/broken", "http://127.0.0.1:9/whl/cpu", "http://no-such-host.invalid/whl/cpu"):
            assert not answers(index), index
    finally:
        server.shutdown()
    recipe = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert '$(PY) configs/index_answers.py "$(TORCH_CPU_INDEX)"' in recipe
    assert 'set -- --extra-index-url "$(TORCH_CPU_INDEX)"' in recipe and 'torch==2.13.0 "$$@"' in recipe


def test_a_failed_step_of_the_set_up_stops_it_and_leaves_it_to_be_done_again(tmp_path):
    """The set-up's steps sat on the left of `||`, where the shell ignores `set -e`: a failed torch
    install went on to `pip install -e .` (PyPI's CUDA torch, gigabytes) and marked the set-up done."""
    import subprocess

    calls = tmp_path / "calls"
    fake = tmp_path / "python3"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case "$*" in
  "-m venv "*) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  *"torch==2.13.0"*) exit 1 ;;
  "-c import torch") exit 1 ;;
esac
exit 0
""")
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), f"{venv}/.installed", f"PYTHON={fake}",
                           f"VENV={venv}", f"DVC_VENV={tmp_path / 'dvc'}", f"LOG={tmp_path / 'install.log'}",
                           "TORCH_CPU_INDEX=file:///local"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "install failed" in done.stderr
    assert not (venv / ".installed").exists()  # the next `make` tries again
    made = calls.read_text()
    assert "torch==2.13.0 --extra-index-url file:///local" in made and " -e .[test]" not in made
