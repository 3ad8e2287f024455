"""rm_lib.pipeline.code_version: the files a step runs and their hash (Dagster code version, train fingerprint)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from rm_lib.pipeline.code_version import code_hash, step_code

ROOT = Path(__file__).resolve().parents[1]


def test_the_train_code_holds_the_loss_and_the_trainer_but_not_other_steps():
    code = step_code("train")
    assert {"rm_lib/model/loss.py", "rm_lib/training/trainer.py", "rm_lib/steps/train.py", "rm_lib/cli.py"} <= set(code)
    assert "rm_lib/steps/push.py" not in code and "rm_lib/publish/hub.py" not in code
    assert "rm_lib/cli.py" not in step_code("train", cli=False)
    assert len({code_hash(step) for step in ("download", "tokenize", "filter", "train", "evaluate", "push")}) == 6


def _hash_in(copy: Path, step: str) -> str:
    code = f"from rm_lib.pipeline.code_version import code_hash; print(code_hash({step!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(copy)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_hash_changes_with_the_code_the_step_runs_and_only_with_it(tmp_path):
    shutil.copytree(ROOT / "rm_lib", tmp_path / "rm_lib", ignore=shutil.ignore_patterns("__pycache__"))
    before = _hash_in(tmp_path, "train")
    assert before == code_hash("train")  # the same bytes give the same hash wherever they lie
    (tmp_path / "rm_lib/steps/push.py").write_text((ROOT / "rm_lib/steps/push.py").read_text() + "\n# edit\n")
    (tmp_path / "rm_lib/cli.py").write_text((ROOT / "rm_lib/cli.py").read_text() + "\n# edit\n")
    assert _hash_in(tmp_path, "train") == before  # another step's code, the command line: same training
    loss = tmp_path / "rm_lib/model/loss.py"
    loss.write_text(loss.read_text().replace("-", "+", 1))
    assert _hash_in(tmp_path, "train") != before


def test_a_long_running_process_sees_an_edit_of_what_a_step_imports(tmp_path, monkeypatch):
    """A Dagster code server asks for the code hash at every run: an import added since the last ask, or a
    module file created for a name already imported, is in the step's code at the next ask."""
    from rm_lib.pipeline import code_version

    shutil.copytree(ROOT / "rm_lib", tmp_path / "rm_lib", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_version, "ROOT", tmp_path)
    monkeypatch.setattr(code_version, "PACKAGE", tmp_path / "rm_lib")
    assert "rm_lib/publish/hub.py" not in step_code("train")
    train = tmp_path / "rm_lib/steps/train.py"
    train.write_text("import rm_lib.publish.hub\nfrom rm_lib.model import extra\n" + train.read_text())
    assert "rm_lib/publish/hub.py" in step_code("train")
    assert "rm_lib/model/extra.py" not in step_code("train")
    (tmp_path / "rm_lib/model/extra.py").write_text("")
    assert "rm_lib/model/extra.py" in step_code("train")
