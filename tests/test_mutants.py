"""tests/mutants.py breaks each promised rule on purpose and runs the tests that must then fail (`make
mutants`, about 15 minutes). Here, in the fast tier: every mutant still applies to the code, and the
machinery catches one mutant for real."""
from __future__ import annotations

from pathlib import Path

import mutants


def test_every_mutant_applies_once_and_names_tests_that_exist():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))
    for mutant in mutants.MUTANTS:
        assert mutants.applies(mutant), f"{mutant.name}: {mutant.file} no longer holds {mutant.old!r}"
        assert mutant.new != mutant.old
        assert all((mutants.ROOT / test).is_file() for test in mutant.tests), mutant.tests


def test_a_mutant_is_caught_in_a_copy_and_the_project_is_left_as_it_was(tmp_path):
    mutant = next(m for m in mutants.MUTANTS if m.name == "test_prompts_in_train")
    before = (mutants.ROOT / mutant.file).read_bytes()
    copy = tmp_path / "project"
    mutants._copy_project(copy)
    caught, line = mutants.run(mutant, copy)
    assert caught and line.startswith("FAILED tests/test_download.py::"), line
    assert (copy / mutant.file).read_bytes() == before == (mutants.ROOT / mutant.file).read_bytes()
    assert Path(copy / "tests" / "mutants.py").is_file()
