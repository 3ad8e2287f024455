"""The release gate lives in rm_lib (rm_lib/evaluation/quality.py) and holds in the push step, so the CLI, a
lone Dagster materialization of hub_release and `dvc repro` (tests/test_dvc.py) refuse the same
model; `push.force=true` releases it anyway and the model card says so."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rm_lib.evaluation import quality
from rm_lib.files import write_json
from rm_lib.layout import Layout
from rm_lib.steps.push import ReleaseBlocked

from helpers import committed_project, run_steps, tiny_params, write_jsonl

STEPS = ("download", "tokenize", "filter", "train", "evaluate")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_decoder) -> Path:
    root = tmp_path_factory.mktemp("evaluated")
    run_steps(tiny_params("train.max_steps=2", model=str(tiny_decoder)), root, *STEPS)
    return root


@pytest.fixture
def project(evaluated, tmp_path) -> Path:
    return Path(shutil.copytree(evaluated, tmp_path / "project", symlinks=True))


def accuracy(root: Path) -> float:
    return json.loads((Layout(root).evaluation / "report.json").read_text())["accuracy"]


def as_compared(record: dict) -> dict:
    """A release's evaluation.json as a push that compared it with the last release writes it (tiny_params
    turns the comparison off, and such a release passes the bar on)."""
    return {k: v for k, v in record.items() if k != quality.UNCOMPARED_DRY_RUN}


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(root), *args, "push"], cwd=root,
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)


def test_the_cli_refuses_a_model_below_the_minimum_and_writes_nothing(project, tiny_decoder):
    assert accuracy(project) < 1.0, "this test needs a model below perfect accuracy"
    out = cli(project, "--set", f"model.name_or_path={tiny_decoder}", "--set", "push.min_accuracy=1.0")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.strip()]
    assert line.startswith("error: push: release refused by the release gate") and "push.force=true" in line
    assert "below the minimum 1.0000" in line
    assert not Layout(project).release.exists()  # nothing written, nothing uploaded


def test_a_dry_run_below_the_gate_writes_the_release_saying_so_and_the_bar_stays(project, tiny_decoder):
    """`dvc exp run -S push.dry_run=true` (docs/dvc.md: try settings without publishing) of a model below the
    last release failed at push, and DVC lost the experiment. A dry run now writes what a push would upload,
    its card saying the gate failed; the next push is judged against the same bar, not against it."""
    from rm_lib.evaluation.quality import REFUSED_MARK

    run_steps(tiny_params("push.min_accuracy=0", model=str(tiny_decoder)), project, "push")
    release = Layout(project).release
    previous = json.loads((release / "evaluation.json").read_text())  # as an earlier, better model's release
    better = accuracy(project) + 0.01
    write_json(release / "evaluation.json", {**as_compared(previous), "accuracy": better,
                                             "inputs": {**previous["inputs"], "model": "an earlier model"}})
    dry = tiny_params("push.min_accuracy=0", "push.compare_with_release=true", "push.dry_run=true",
                      model=str(tiny_decoder))
    said = run_steps(dry, project, "push")["push"].summary()
    assert "the release gate refuses this model, judged against data/release" in said
    assert f"below the last released model's {better:.4f}" in said
    card = (release / "README.md").read_text()
    assert REFUSED_MARK in card and "**failed**" in card
    # the bar stays the earlier release's: a push of this model is refused as before the dry run
    with pytest.raises(ReleaseBlocked, match=f"below the last released model's {better:.4f}"):
        run_steps(tiny_params("push.min_accuracy=0", "push.compare_with_release=true", model=str(tiny_decoder)),
                  project, "push")
    # a dry run of the released model itself under a stricter gate: that release stays the bar (its own
    # bar, which a push again of the same model is judged against, passed on as the bar erased it)
    from rm_lib.evaluation import quality

    shutil.rmtree(release)  # this model released, compared with nothing before it
    run_steps(tiny_params("push.min_accuracy=0", "push.compare_with_release=true", model=str(tiny_decoder)),
              project, "push")
    released = json.loads((release / "evaluation.json").read_text())["inputs"]["model"]
    run_steps(tiny_params("push.min_accuracy=1.0", "push.dry_run=true", model=str(tiny_decoder)), project, "push")
    bar = quality.release_bar(Layout(project), "another model")
    assert bar is not None and bar["model"] == released and bar["accuracy"] == accuracy(project)


@pytest.mark.parametrize("written_here", [["push.dry_run=true"], []])  # a dry run; no push.repo_id (the default)
def test_a_dry_run_that_compared_nothing_leaves_the_bar_where_it_was(project, tiny_decoder, written_here):
    """A dry run (or a push without push.repo_id) under push.compare_with_release=false passes whatever the
    last release's accuracy, and it writes data/release: a model below the last release became the bar that
    later dry runs, pushes without push.repo_id and Dagster's release_gate check were judged against. It
    passes the earlier bar on."""
    run_steps(tiny_params("push.min_accuracy=0", model=str(tiny_decoder)), project, "push")
    release = Layout(project).release
    previous = json.loads((release / "evaluation.json").read_text())
    better = accuracy(project) + 0.01
    write_json(release / "evaluation.json", {**as_compared(previous), "accuracy": better,
                                             "inputs": {**previous["inputs"], "model": "an earlier model"}})
    uncompared = run_steps(tiny_params("push.min_accuracy=0", *written_here, model=str(tiny_decoder)),
                           project, "push")["push"]
    assert not uncompared.refused
    assert quality.release_bar(Layout(project), "another model")["accuracy"] == better
    with pytest.raises(ReleaseBlocked, match=f"below the last released model's {better:.4f}"):
        run_steps(tiny_params("push.min_accuracy=0", "push.compare_with_release=true", model=str(tiny_decoder)),
                  project, "push")


def test_force_releases_and_the_card_says_the_gate_failed(project, tiny_decoder):
    params = tiny_params("push.min_accuracy=1.0", "push.force=true", model=str(tiny_decoder))
    said = run_steps(params, project, "push")["push"].summary()
    # the push line says it too (it said nothing of the failure, or "release gate passed" of the accuracy
    # where another check had failed)
    assert "warning: the release gate failed (release_gate: " in said
    assert "under push.force=true it would be released anyway (nothing was uploaded), its card saying so" in said
    other = run_steps(tiny_params("push.min_accuracy=0", "push.max_length_correlation=0.000001", "push.force=true",
                                  model=str(tiny_decoder)), project, "push")["push"].summary()
    assert "warning: the release gate failed (length_correlation_gate: " in other
    card = (Layout(project).release / "README.md").read_text()
    assert "## Release gate" in card and "push.force=true" in card and "**failed**" in card
    # a passing gate is shown too, without the warning
    run_steps(tiny_params("push.min_accuracy=0", model=str(tiny_decoder)), project, "push")
    card = (Layout(project).release / "README.md").read_text()
    assert "## Release gate" in card and "push.force=true" not in card and "**failed**" not in card


def test_a_model_below_the_last_release_is_refused_and_the_release_kept(project, tiny_decoder):
    run_steps(tiny_params("push.min_accuracy=0", model=str(tiny_decoder)), project, "push")
    release = Layout(project).release
    before = {p.name: p.read_bytes() for p in release.iterdir() if p.is_file()}
    previous = json.loads((release / "evaluation.json").read_text())  # as an earlier, better model's release
    write_json(release / "evaluation.json", {**as_compared(previous), "accuracy": accuracy(project) + 0.01,
                                             "inputs": {**previous["inputs"], "model": "an earlier model"}})
    before["evaluation.json"] = (release / "evaluation.json").read_bytes()
    params = tiny_params("push.min_accuracy=0", "push.compare_with_release=true", model=str(tiny_decoder))
    with pytest.raises(ReleaseBlocked, match="below the last released model"):
        run_steps(params, project, "push")
    assert {p.name: p.read_bytes() for p in release.iterdir() if p.is_file()} == before


def test_a_model_is_never_judged_against_itself_nor_against_a_forced_release(project, tiny_decoder, monkeypatch):
    """data/release holds what push last built. Judged against it, the first upload after a dry run was
    compared with itself, and a forced release pushed again with push.force off passed against itself,
    its card no longer saying it was never vetted."""
    from rm_lib.publish import hub

    uploads = []
    monkeypatch.setattr(hub, "upload", lambda out, repo_id, **kw: uploads.append(repo_id) or {
        "url": f"https://hub.example/{repo_id}", "commit": "c0ffee", "repo_id": repo_id, "tag": kw["tag"]})
    release = Layout(project).release
    # the Hub holds what this folder last pushed (tests/test_hub.py reads a real repository's head)
    monkeypatch.setattr(hub, "current_release", lambda repo_id, into, kept: hub.HubRelease(repo_id, "c0ffee", True,
                                                                                          release))
    mine = accuracy(project)

    def push(*settings: str) -> None:
        run_steps(tiny_params("push.min_accuracy=0", "push.compare_with_release=true", *settings,
                              model=str(tiny_decoder)), project, "push")

    def recorded() -> dict:
        return json.loads((release / "evaluation.json").read_text())

    push()  # a dry run
    dry = (release / "evaluation.json").read_bytes()
    push("push.repo_id=me/rm")  # the same model uploaded: not compared with itself
    assert "the last released model" not in (release / "README.md").read_text() and uploads == ["me/rm"]
    assert (release / "evaluation.json").read_bytes() == dry  # the dry run wrote what the upload sent
    assert recorded()[quality.JUDGED_AGAINST] is None and recorded()["forced"] is False
    # a better model was released before this one (data/release as that release left it)
    better = {**recorded(), "accuracy": mine + 0.05, "inputs": {**recorded()["inputs"], "model": "a better model"}}
    write_json(release / "evaluation.json", better)
    with pytest.raises(ReleaseBlocked, match=f"below the last released model's {mine + 0.05:.4f}"):
        push("push.repo_id=me/rm")
    push("push.repo_id=me/rm", "push.force=true")  # released knowingly, judged against the better one
    assert recorded()["forced"] is True and recorded()[quality.JUDGED_AGAINST]["accuracy"] == mine + 0.05
    with pytest.raises(ReleaseBlocked, match=f"below the last released model's {mine + 0.05:.4f}"):
        push("push.repo_id=me/rm")  # force off again: the forced release is no bar, the better one still is
    assert uploads == ["me/rm", "me/rm"]


def test_the_report_names_its_test_pairs_and_push_says_what_it_was_compared_with(project, tiny_decoder):
    """The CLI line and the model card carry the verdict, passing ones too: here, that the last release
    was of another source and was not compared."""
    from rm_lib.data.tokenstore import read_rows

    layout = Layout(project)
    report = json.loads((layout.evaluation / "report.json").read_text())
    rows = read_rows(layout.filtered / "test.parquet")
    digests, correct = report["test_data"].pop("digests"), report["test_data"].pop("correct")
    assert report["test_data"] == {"source": "demo", "subset": None, "pairs": report["pairs"],
                                   "hash": quality.test_pairs_hash(rows)}
    assert len(digests) == len(rows) == report["pairs"] and digests == sorted(digests)
    # which pairs the model got right, in the digests' order: as many as the accuracy counts
    assert len(correct) == len(digests) and set(correct) <= {"0", "1"}
    assert correct.count("1") == round(report["accuracy"] * report["pairs"])
    params = tiny_params("push.compare_with_release=true", model=str(tiny_decoder))
    first = run_steps(params, project, "push")["push"].summary()
    assert f"release gate passed: accuracy {report['accuracy']:.4f} on {report['pairs']} test pairs" in first
    released = json.loads((layout.release / "evaluation.json").read_text())
    write_json(layout.release / "evaluation.json", {
        **released, "accuracy": 1.0, "inputs": {"model": "a model of other data"},
        "test_data": {**released["test_data"], "source": "hh-rlhf-harmless.jsonl.gz", "hash": "other"}})
    said = "it was measured on another source (hh-rlhf-harmless.jsonl.gz; this model: demo)"
    second = run_steps(params, project, "push")["push"].summary()
    assert "not compared with the last released model (1.0000" in second and said in second
    assert said in (layout.release / "README.md").read_text()


def test_a_diverged_model_is_refused_whatever_its_accuracy(project, tiny_decoder):
    summary = Layout(project).train_logs / "run.json"
    summary.write_text(summary.read_text().replace('"final_loss": ', '"final_loss": NaN, "was": '))
    with pytest.raises(ReleaseBlocked, match="loss_is_finite"):
        run_steps(tiny_params("push.min_accuracy=0", model=str(tiny_decoder)), project, "push")


def test_a_lone_hub_release_materialization_is_refused(project, tiny_decoder):
    """Materializing hub_release alone skips the evaluation's blocking check; the step still refuses."""
    import dagster as dg

    from orchestration import assets, checks
    from orchestration.launcher import TrainLauncherResource
    from orchestration.resources import DvcResource, HubResource, ProjectResource, WandbResource

    overrides = [f"model.name_or_path={tiny_decoder}", "push.min_accuracy=1.0", "filter.max_token_length=64",
                 "filter.max_prompt_token_length=32", "download.demo_pairs=60"]
    result = dg.materialize(
        [*assets.ASSETS, *checks.CHECKS], selection=dg.AssetSelection.assets("hub_release"),
        resources={"project": ProjectResource(root=str(project), params_file=str(REPO / "params.yaml"),
                                              overrides=overrides),
                   "hub": HubResource(), "dvc": DvcResource(enabled=False), "wandb": WandbResource(),
                   "trainer": TrainLauncherResource()},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "release refused by the release gate" in failure.step_failure_data.error.message
    assert not Layout(project).release.exists()


# ---------------------------------------------------------------- the rules as plain functions

def test_verdicts_of_the_data_rules(tmp_path):
    layout = Layout(tmp_path)
    assert not quality.pairs_well_formed(layout).passed  # nothing written yet
    good = {"id": 1, "prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    write_jsonl(layout.pairs / "train.jsonl", [good])
    write_jsonl(layout.pairs / "test.jsonl", [{**good, "id": 2, "prompt": [{"role": "user", "content": "q"}]}])
    assert quality.pairs_well_formed(layout).passed and quality.no_prompt_overlap(layout).passed
    write_jsonl(layout.pairs / "test.jsonl", [{**good, "id": 2, "rejected": good["chosen"]}])
    verdict = quality.pairs_well_formed(layout)
    assert not verdict.passed and verdict.metadata["identical"] == 1 and not verdict.warn_only
    overlap = quality.no_prompt_overlap(layout)
    assert not overlap.passed and overlap.warn_only and overlap.metadata["shared_prompts"] == 1
    write_json(layout.pairs / "manifest.json", {"rows_read": 10, "rejected": 2, "rejects_by_reason": {"x": 2}})
    assert not quality.rejects_ratio(layout, 0.1).passed and quality.rejects_ratio(layout, 0.2).passed


def test_the_length_baseline_and_the_accuracy_gate(tmp_path):
    layout = Layout(tmp_path)
    report = {"accuracy": 0.7, "longer_wins_baseline": 0.75, "shorter_wins_baseline": 0.2, "data_hash": "h",
              "pairs": 100}
    write_json(layout.evaluation / "report.json", report)
    assert quality.length_baseline(report) == 0.75
    assert not quality.beats_length_baseline(layout).passed
    write_json(layout.evaluation / "report.json", {**report, "accuracy": 0.75})  # no better than length alone
    assert not quality.beats_length_baseline(layout).passed
    write_json(layout.evaluation / "report.json", {**report, "accuracy": 0.76})
    assert quality.beats_length_baseline(layout).passed
    write_json(layout.evaluation / "report.json", report)
    assert quality.accuracy_gate(layout, 0.6).passed and not quality.accuracy_gate(layout, 0.71).passed
    assert quality.accuracy_gate(layout, 0.7).passed  # the minimum itself is enough
    write_json(layout.release / "evaluation.json", {**report, "accuracy": 0.8})
    assert not quality.accuracy_gate(layout, 0.6).passed
    assert quality.accuracy_gate(layout, 0.6, compare_with_release=False).passed


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_report_whose_accuracy_is_not_a_number_releases_nothing(tmp_path, value):
    """A report edited by hand or written by a broken evaluation: NaN compares false with every bar."""
    layout = Layout(tmp_path)
    layout.evaluation.mkdir(parents=True)
    (layout.evaluation / "report.json").write_text(f'{{"accuracy": {value}, "pairs": 100, "data_hash": "h"}}')
    for minimum in (0.0, 0.6):
        verdict = quality.accuracy_gate(layout, minimum)
        assert not verdict.passed and "is below the minimum" in verdict.description, verdict.description


def test_an_accuracy_of_a_handful_of_test_pairs_releases_nothing(tmp_path):
    """A smoke run (1 test pair, accuracy 1.0) passed push.min_accuracy 0.6 and was released."""
    from rm_lib.settings import PushSettings

    layout = Layout(tmp_path)
    write_json(layout.evaluation / "report.json", {"accuracy": 1.0, "pairs": 1, "data_hash": "h"})
    verdict = quality.evaluation_gate(layout, PushSettings())[0]  # push.min_test_pairs: 50 by default
    assert not verdict.passed and "1 held-out pair, fewer than push.min_test_pairs (50)" in verdict.description
    assert "95% interval 0.21 to 1.00" in verdict.description
    assert quality.evaluation_gate(layout, PushSettings(min_test_pairs=1, min_accuracy=0.5))[0].passed


@pytest.mark.parametrize("accuracy, pairs, passed", [(0.6, 50, False), (0.61, 60, False), (0.62, 100, True),
                                                     (0.64, 50, True), (0.6, 200, True), (0.9, 10, True)])
def test_a_minimum_above_chance_asks_for_an_accuracy_above_chance_beyond_noise(tmp_path, accuracy, pairs, passed):
    """The defaults (push.min_accuracy 0.6 on push.min_test_pairs 50) released a model of accuracy 0.6 on
    50 pairs, whose 95% interval (0.46 to 0.72) holds a coin's 0.5. A minimum above chance now asks for
    an interval above 0.5; a minimum of 0.5 or less asks for nothing of the kind."""
    from rm_lib.settings import PushSettings

    layout = Layout(tmp_path)
    write_json(layout.evaluation / "report.json", {"accuracy": accuracy, "pairs": pairs, "data_hash": "h"})
    low, high = quality.wilson_interval(accuracy, pairs)
    verdict = quality.evaluation_gate(layout, PushSettings(min_test_pairs=10))[0]
    assert verdict.passed is passed is (low > 0.5), verdict.description
    assert verdict.metadata["accuracy_interval_95"] == f"{low:.4f} to {high:.4f}"
    if not passed:
        assert verdict.description == (
            f"release blocked: accuracy {accuracy:.4f} on {pairs} held-out pairs is not above chance beyond sampling "
            f"noise (95% interval {low:.2f} to {high:.2f} holds 0.5): measure it on more pairs "
            "(download.test_fraction) or train a better model")
    assert quality.evaluation_gate(layout, PushSettings(min_test_pairs=10, min_accuracy=0.5))[0].passed


def test_the_gate_bounds_each_subset_and_the_length_correlation(tmp_path):
    from rm_lib.settings import PushSettings

    layout = Layout(tmp_path)
    write_json(layout.evaluation / "report.json", {
        "accuracy": 0.8, "longer_wins_baseline": 0.5, "shorter_wins_baseline": 0.4, "data_hash": "h", "pairs": 100,
        "reward_length_correlation": -0.45,
        "per_subset": {"helpful": {"pairs": 50, "accuracy": 0.9}, "harmless": {"pairs": 50, "accuracy": 0.55}}})
    unset = quality.evaluation_gate(layout, PushSettings(min_accuracy=0.6))
    assert all(v.passed for v in unset[1:3])  # both bounds are off by default
    assert not quality.blocking_failures(unset)  # a report without the base-overlap count warns only
    verdicts = quality.evaluation_gate(layout, PushSettings(min_accuracy=0.6, min_subset_accuracy=0.6,
                                                            max_length_correlation=0.3))
    subset, correlation = verdicts[1], verdicts[2]
    assert not subset.passed and "harmless 0.5500" in subset.description and "helpful" not in subset.description
    assert not correlation.passed and "0.4500" in correlation.description  # the size of r, either sign
    shown = quality.combined("release_gate", verdicts)
    assert not shown.passed and "harmless" in shown.description and "correlation" in shown.description
    assert quality.evaluation_gate(layout, PushSettings(min_subset_accuracy=0.5, max_length_correlation=0.5))[1].passed
    assert quality.evaluation_gate(layout, PushSettings(min_subset_accuracy=0.5, max_length_correlation=0.5))[2].passed


@pytest.mark.parametrize("report, passed, said", [
    ({"reward_length_correlation": None, "reward_std": 0.0}, True, "the model gives every answer one reward"),
    ({"reward_length_correlation": None, "reward_std": 0.3}, True, "the answers share one length"),
    ({"reward_length_correlation": float("nan"), "reward_std": float("nan")}, False, "not a number"),
])
def test_the_length_gate_says_why_the_correlation_is_undefined(tmp_path, report, passed, said):
    """A constant reward (a collapsed model) was said to be answers of one length; a NaN read as "above"."""
    from rm_lib.settings import PushSettings

    layout = Layout(tmp_path)
    write_json(layout.evaluation / "report.json", report)
    verdict = quality.length_correlation_gate(layout, PushSettings(max_length_correlation=0.3).max_length_correlation)
    assert verdict.passed is passed and said in verdict.description, verdict.description


def test_push_refuses_a_model_over_the_length_bound_on_every_front_end_it_shares(tmp_path, tiny_decoder):
    """The bound lives in the push step: the CLI, `dvc repro` and Dagster all run it."""
    from rm_lib.steps.push import ReleaseBlocked

    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    r = json.loads((Layout(tmp_path).evaluation / "report.json").read_text())["reward_length_correlation"]
    tight = tiny_params("train.max_steps=2", f"push.max_length_correlation={abs(r) / 2:.6f}", model=str(tiny_decoder))
    with pytest.raises(ReleaseBlocked, match="push.max_length_correlation"):
        run_steps(tight, tmp_path, "push")
    assert not (Layout(tmp_path).release / "README.md").exists()
    loose = tiny_params("train.max_steps=2", "push.max_length_correlation=1", model=str(tiny_decoder))
    run_steps(loose, tmp_path, "push")
    card = (Layout(tmp_path).release / "README.md").read_text()
    assert "length_correlation_gate" in card and "reward-length correlation" in card


# ---------------------------------------------------------------- what the last release is compared with

def held_out(source="data/sources/prefs.jsonl", pairs=80, digest="t1", subset=None, first=0) -> dict:
    """A test_data record of `pairs` pairs whose digests are those of pairs first..first+pairs-1."""
    return {"source": source, "subset": subset, "pairs": pairs, "hash": digest,
            "digests": [f"{i:016x}" for i in range(first, first + pairs)]}


def judged(tmp_path, accuracy, mine, theirs, release_accuracy, min_test_pairs=50, data_hash=("d1", "d2"),
           **release) -> quality.Verdict:
    """The accuracy gate on a report of `accuracy` measured on `mine` (test_data), the last release
    having `release_accuracy` on `theirs` (None: a release by a version that did not record it)."""
    layout = Layout(tmp_path)
    write_json(layout.evaluation / "report.json", {"accuracy": accuracy, "pairs": mine["pairs"], "test_data": mine,
                                                   "data_hash": data_hash[0], "inputs": {"model": "new"}})
    write_json(layout.release / "evaluation.json", {
        "accuracy": release_accuracy, "data_hash": data_hash[1], "inputs": {"model": "released"},
        "pairs": (theirs or mine)["pairs"], **({"test_data": theirs} if theirs else {}), **release})
    return quality.accuracy_gate(layout, 0.6, min_test_pairs=min_test_pairs)


def test_a_release_of_another_source_is_not_compared_and_the_verdict_says_so(tmp_path):
    """The demo's 0.85 was the bar of a model trained on other data, whose accuracy is of other pairs."""
    verdict = judged(tmp_path, 0.7, held_out("hh-rlhf-harmless.jsonl.gz"), held_out("demo", 392, "t0"), 0.85)
    assert verdict.passed, verdict.description
    assert "not compared with the last released model (0.8500 on 392 pairs)" in verdict.description
    assert "another source (demo; this model: hh-rlhf-harmless.jsonl.gz)" in verdict.description
    assert verdict.metadata["compared_with_previous"] is False
    # another subset of one Hub dataset is another source as well
    verdict = judged(tmp_path, 0.7, held_out("Anthropic/hh-rlhf", subset="harmless-base"),
                     held_out("Anthropic/hh-rlhf", subset="helpful-base"), 0.85)
    assert verdict.passed and "another source" in verdict.description and "subset helpful-base" in verdict.description


def test_a_release_whose_accuracy_is_no_number_is_said_not_compared(tmp_path):
    """A Hub release whose evaluation.json says NaN or Infinity (Python's JSON reader takes both): the gate
    passed and uploaded over it, its verdict saying nothing of the release."""
    for previous in (float("nan"), float("inf")):
        verdict = judged(tmp_path, 0.7, held_out(), held_out(), previous)
        assert verdict.passed, verdict.description
        assert f"not compared with the last released model: its evaluation.json gives the accuracy {previous}," \
            in verdict.description and verdict.metadata["compared_with_previous"] is False


def test_a_release_measured_on_a_handful_of_pairs_by_an_older_version_is_no_bar(tmp_path):
    """1 test pair at accuracy 1.0 (a release from before push.min_test_pairs) was the bar every real
    model fell below. A release since then passed push.min_test_pairs: raising the setting later keeps
    it a bar (else a higher setting would switch the comparison off)."""
    verdict = judged(tmp_path, 0.65, held_out(pairs=80), None, 1.0, pairs=1)
    assert verdict.passed, verdict.description
    assert "not compared with the last released model (1.0000): it was measured on only 1 held-out pair (this " \
           "model on 80), fewer than push.min_test_pairs (50)" in verdict.description
    verdict = judged(tmp_path, 0.70, held_out(pairs=600), held_out(pairs=397, digest="t0"), 0.85, min_test_pairs=400)
    assert not verdict.passed and "below the last released model's 0.8500" in verdict.description


def test_a_drop_on_nearly_the_same_test_pairs_is_refused_and_on_another_sample_within_its_noise_is_not(tmp_path):
    """A grown source keeps nearly all its held-out pairs (the split ranks prompts by their own hash): the
    two accuracies share most of their pairs, so a drop is a drop. Another seed or test fraction draws
    mostly other pairs: two samples, whose accuracies differ by sampling noise alone."""
    grown = judged(tmp_path, 0.80, held_out(pairs=398, first=1), held_out(pairs=397, digest="t0"), 0.85)
    assert not grown.passed
    assert "below the last released model's 0.8500, measured on other test pairs (398 pairs here, 397 there, " \
        "396 shared)" in grown.description
    reseeded = judged(tmp_path, 0.83, held_out(pairs=400, first=1000), held_out(pairs=397, digest="t0"), 0.85)
    assert reseeded.passed, reseeded.description
    assert "0 shared), by no more than the sampling noise of the two" in reseeded.description
    assert 0 < reseeded.metadata["noise_margin"] < 0.1
    worse = judged(tmp_path, 0.70, held_out(pairs=400, first=1000), held_out(pairs=397, digest="t0"), 0.85)
    assert not worse.passed and "by more than the sampling noise of the two" in worse.description
    for accuracy, passed in ((0.794, False), (0.799, True)):  # either side of the 95% bound, about 0.797
        verdict = judged(tmp_path, accuracy, held_out(pairs=400, first=1000), held_out(pairs=397, digest="t0"), 0.85)
        assert verdict.passed is passed is (accuracy >= 0.85 - verdict.metadata["noise_margin"]), verdict.description


def right(record: dict, wrong: set[int]) -> dict:
    """`record` (held_out) saying the model got every pair right but those numbered in `wrong`."""
    return {**record, "correct": "".join("0" if int(d, 16) in wrong else "1" for d in record["digests"])}


def test_where_both_say_which_pairs_they_got_right_the_gate_compares_them_on_the_pairs_both_hold(tmp_path):
    """A source grown by a week's rows, or another seed's split: the gate compared the whole accuracies,
    of partly other pairs, though both reports say which held-out pairs each model got right. On the pairs
    both hold the comparison is like for like: strictly where they are nearly the whole sample (one worse
    there is refused though its whole accuracy is higher), else a drop beyond chance (McNemar's test on
    the pairs only one got right); the whole accuracies within the noise of two samples as well."""
    old = held_out(pairs=300, digest="t0")  # pairs 0..299
    grown = held_out(pairs=330, first=0)  # 30 new pairs, 300..329: 300 of 330 shared, over 90%
    released = right(old, set(range(0, 60)))  # 0.8
    harder_new = right(grown, set(range(0, 60)) | set(range(300, 320)))  # the same 240 of 300, 10 of 30 new
    verdict = judged(tmp_path, 250 / 330, harder_new, released, 0.8)
    assert verdict.passed, verdict.description
    assert verdict.description == (
        "release gate passed: accuracy 0.7576 on 330 test pairs >= minimum 0.6000; on the 300 test pairs both were "
        "measured on (330 pairs here, 300 there) >= the last released model's 0.8000 (this model 0.8000); on all "
        "their pairs below the last released model's 0.8000, measured on other test pairs (330 pairs here, 300 "
        "there, 300 shared), by no more than the sampling noise of the two (0.0652 at 95%)")
    assert verdict.metadata["accuracy_on_shared_test_pairs"] == 0.8 and verdict.metadata["shared_test_pairs"] == 300
    worse_there = right(grown, set(range(0, 61)))  # one more shared pair wrong, every new pair right
    verdict = judged(tmp_path, 269 / 330, worse_there, released, 0.8)
    assert not verdict.passed
    assert "accuracy 0.7967 on the 300 test pairs both were measured on (330 pairs here, 300 there) is below the " \
           "last released model's 0.8000 on them; set" in verdict.description
    # as good on the shared pairs and wrong on every new one: the whole accuracies' noise rule refuses it
    new_wrong = right(grown, set(range(0, 60)) | set(range(300, 330)))
    verdict = judged(tmp_path, 240 / 330, new_wrong, released, 0.8)
    assert not verdict.passed and verdict.description.startswith(
        "release blocked: accuracy 0.7273 is below the last released model's 0.8000, measured on other test pairs "
        "(330 pairs here, 300 there, 300 shared), by more than the sampling noise of the two (0.0666 at 95%); on the "
        "300 test pairs both were measured on (330 pairs here, 300 there) >= the last released model's 0.8000 (this "
        "model 0.8000); set push.compare_with_release=false")
    # a release by a version that did not record which it got right: the whole accuracies, as before
    verdict = judged(tmp_path, 269 / 330, worse_there, old, 0.8)
    assert verdict.passed and verdict.description.endswith(
        "minimum 0.6000 and >= the last released model's 0.8000, measured on other test pairs (330 pairs here, 300 "
        "there, 300 shared): not like for like")
    # another seed: 100 pairs shared of 400 and 397 (297..396), part of each sample
    earlier = right(held_out(pairs=397, digest="t0"), set(range(297, 324)))  # 0.73 on the shared pairs
    close = right(held_out(pairs=400, first=297, digest="t2"), set(range(297, 327)) | set(range(400, 430)))
    for accuracy, whole in ((0.85, "on all their pairs >= the last released model's 0.8300, measured on other test "
                                    "pairs (400 pairs here, 397 there, 100 shared): not like for like"),
                            (0.80, "on all their pairs below the last released model's 0.8300, measured on other "
                                   "test pairs (400 pairs here, 397 there, 100 shared), by no more than the "
                                   "sampling noise of the two (0.0540 at 95%)")):
        verdict = judged(tmp_path, accuracy, close, earlier, 0.83)  # 0.70 there: 3 only the release got right
        assert verdict.passed and verdict.description == (
            f"release gate passed: accuracy {accuracy:.4f} on 400 test pairs >= minimum 0.6000; on the 100 test pairs "
            "both were measured on (400 pairs here, 397 there) below the last released model's 0.7300 (this model "
            "0.7000) by no more than chance allows (3 of them only the release got right, 0 only this model; chance "
            f"allows a difference of 4.4); {whole}")
    worse = right(held_out(pairs=400, first=297, digest="t2"), set(range(297, 341)))  # 17 only the release got
    verdict = judged(tmp_path, 0.89, worse, earlier, 0.83)
    assert not verdict.passed and "by more than chance allows (17 of them only the release got right" in \
        verdict.description
    either_way = right(held_out(pairs=400, first=297, digest="t2"), set(range(327, 367)))  # 40 lost, 27 gained
    verdict = judged(tmp_path, 0.9, either_way, earlier, 0.83)
    assert verdict.passed and "(40 of them only the release got right, 27 only this model;" in verdict.description
    assert verdict.metadata["shared_pairs_only_the_release_got_right"] == 40
    # as good on the shared pairs, far worse on its others: the whole accuracies' noise rule holds it back too
    unshared_worse = right(held_out(pairs=400, first=297, digest="t2"), set(range(297, 324)) | set(range(400, 500)))
    verdict = judged(tmp_path, 0.68, unshared_worse, earlier, 0.83)
    assert not verdict.passed and "by more than the sampling noise of the two" in verdict.description
    # fewer shared than push.min_test_pairs: too few to judge on, the whole accuracies within their noise
    verdict = judged(tmp_path, 0.83, close, earlier, 0.85, min_test_pairs=101)
    assert verdict.passed and "by no more than the sampling noise of the two" in verdict.description


def test_mcnemars_test_counts_each_distinct_pair_once_and_corrects_for_continuity(tmp_path):
    """4 pairs only the release got right and none the other way: refused without the continuity
    correction (4 > 1.96 * 2), though chance gives that 6% of the time; every shared pair held twice by
    both sets doubled that evidence (3 against 0 became 6 against 0, refused)."""
    earlier = right(held_out(pairs=397, digest="t0"), set(range(297, 324)))
    four = right(held_out(pairs=400, first=297, digest="t2"), set(range(297, 328)))
    verdict = judged(tmp_path, 0.9, four, earlier, 0.83)
    assert verdict.passed and "(4 of them only the release got right, 0 only this model; chance allows a " \
        "difference of 4.9)" in verdict.description
    twice = lambda record: {**record, "pairs": 2 * record["pairs"], "digests": sorted(record["digests"] * 2),  # noqa: E731
                            "correct": "".join(c * 2 for c in record["correct"])}
    three = right(held_out(pairs=400, first=297, digest="t2"), set(range(297, 327)))
    verdict = judged(tmp_path, 0.9, twice(three), twice(earlier), 0.83)
    assert verdict.passed and verdict.metadata["shared_test_pairs"] == 200
    assert verdict.metadata["shared_pairs_only_the_release_got_right"] == 3


def test_repeated_shared_pairs_are_counted_as_the_accuracy_counts_them(tmp_path):
    """A pair both test sets hold twice counts twice on the shared pairs, once each where one holds it once."""
    twice = {**held_out(pairs=60, digest="t0"), "pairs": 120}
    twice["digests"] = sorted(twice["digests"] * 2)
    released = right(twice, set(range(0, 12)))  # 24 of 120 wrong: 0.8
    once = right({**held_out(pairs=60, digest="t1"), "pairs": 60}, set(range(0, 12)))
    verdict = judged(tmp_path, 0.8, once, released, 0.8)
    assert verdict.metadata["shared_test_pairs"] == 60 and verdict.metadata["accuracy_on_shared_test_pairs"] == 0.8
    both = right({**twice, "hash": "t2"}, set(range(0, 13)))  # each shared pair counted twice: 26 wrong of 120
    verdict = judged(tmp_path, 94 / 120, both, released, 0.8)
    assert verdict.metadata["shared_test_pairs"] == 120 and not verdict.passed, verdict.description
    assert "accuracy 0.7833 on the 120 test pairs both were measured on" in verdict.description


def test_repeated_test_pairs_count_as_shared_as_often_as_the_accuracy_counts_them(tmp_path):
    """60 of 61 pairs shared, each of 30 pairs held twice: counted once each, the share was 30 of 61, and
    an 8-point drop passed as sampling noise."""
    twice = held_out(pairs=30, digest="t0")
    twice = {**twice, "pairs": 60, "digests": sorted(twice["digests"] * 2)}
    one_more = {**twice, "pairs": 61, "hash": "t1", "digests": sorted([*twice["digests"], f"{999:016x}"])}
    verdict = judged(tmp_path, 0.62, one_more, twice, 0.70)
    assert not verdict.passed and "(61 pairs here, 60 there, 60 shared)" in verdict.description
    assert verdict.metadata["shared_test_pairs"] == 60


def test_a_passing_verdict_says_the_test_pairs_differ(tmp_path):
    """A filter that set aside half the held-out pairs (31 of 63) made a like-for-like win of it."""
    verdict = judged(tmp_path, 0.7, held_out(pairs=31), held_out(pairs=63, digest="t0"), 0.65, min_test_pairs=1)
    said = "measured on other test pairs (31 pairs here, 63 there, 31 shared): not like for like"
    assert verdict.passed and said in verdict.description
    assert verdict.metadata["same_test_data_as_previous"] is False
    assert "on the same 63 test pairs" in judged(tmp_path, 0.7, held_out(pairs=63, digest="t0"),
                                                 held_out(pairs=63, digest="t0"), 0.65).description


def test_the_test_pairs_are_told_apart_by_their_own_identity(tmp_path):
    """filtered/manifest.json's content_hash covers train.parquet too: a change of the training pairs
    alone said "(measured on other test data)" of the same test pairs."""
    rows = [{"input_ids_chosen": [1, 2, 3], "input_ids_rejected": [1, 2]},
            {"input_ids_chosen": [4], "input_ids_rejected": [5]}]
    assert quality.test_pairs_hash(rows) == quality.test_pairs_hash(rows[::-1])  # the order scores nothing
    swapped = [{"input_ids_chosen": [1, 2], "input_ids_rejected": [1, 2, 3]}, rows[1]]
    assert len({quality.test_pairs_hash(r) for r in (rows, swapped, rows[:1])}) == 3
    same_pairs = judged(tmp_path, 0.7, held_out(), held_out(), 0.72, data_hash=("d1", "d2"))
    assert not same_pairs.passed and "below the last released model's 0.7200 on the same 80 test pairs" in \
        same_pairs.description
    assert "other test" not in same_pairs.description and same_pairs.metadata["same_test_data_as_previous"] is True


def test_a_release_by_an_older_version_is_compared_as_then_and_the_verdict_says_so(tmp_path):
    """Its evaluation.json (or the bar it recorded) names no test_data."""
    verdict = judged(tmp_path, 0.7, held_out(), None, 0.72)
    assert not verdict.passed and "whether on the same test pairs is unknown (80 pairs here, 80 there" in \
        verdict.description
    assert verdict.metadata["same_test_data_as_previous"] == "unknown"
    assert judged(tmp_path, 0.7, held_out(), None, 0.72, data_hash=("d1", "d1")).metadata[
        "same_test_data_as_previous"] is True  # the same train and test files: the same pairs
    old_bar = {"accuracy": 0.65, "data_hash": "d0", "model": "older"}  # what an older version recorded
    verdict = judged(tmp_path, 0.7, held_out(), held_out(), 0.9, forced=True, judged_against=old_bar)
    assert verdict.passed and "an unknown number there" in verdict.description


def test_releases_and_records_by_an_earlier_version_are_read_for_what_they_say(project, tiny_decoder, monkeypatch):
    """A project carried over from an earlier version: its forced release (recorded only in its card)
    was a bar the refusal did not explain; the card printed today's params.yaml as the settings of
    records that kept none, and named this commit as the source of a model older code trained."""
    layout = Layout(project)
    params = tiny_params("push.min_accuracy=0", "push.compare_with_release=true", model=str(tiny_decoder))
    run_steps(params, project, "push")
    released = json.loads((layout.release / "evaluation.json").read_text())
    del released["forced"], released[quality.JUDGED_AGAINST]  # as an earlier version wrote it, forced past the gate
    write_json(layout.release / "evaluation.json", {**released, "accuracy": 1.0, "inputs": {"model": "earlier"}})
    card = layout.release / "README.md"
    card.write_text(card.read_text() + f"\n**{quality.FORCED_MARK}** Treat this model as unvetted.\n")
    with pytest.raises(ReleaseBlocked, match="forced past its release gate by an earlier version of rm_lib, which "
                                             "did not record whether a check that blocks had failed"):
        run_steps(params, project, "push")  # its card does not say whether a check that blocks failed
    run_steps(tiny_params("push.min_accuracy=0", "push.compare_with_release=false", model=str(tiny_decoder)),
              project, "push")
    # a filter manifest from before the settings were recorded: what it held at its top, not params.yaml's
    manifest = json.loads((layout.filtered / "manifest.json").read_text())
    del manifest["settings"]
    write_json(layout.filtered / "manifest.json", manifest)
    from rm_lib.pipeline import code_version
    from rm_lib.publish import model_card

    trained_by = json.loads((layout.train_logs / "summary.json").read_text())["code_hash"]
    assert trained_by == code_version.code_hash("train")  # the same code: the commit reproduces it
    assert "Reproduce: check out the commit" in model_card._lineage({"code_hash": trained_by, "git_commit": "abc",
                                                                    "code_hash_now": trained_by})
    monkeypatch.setattr(code_version, "code_hash", lambda step: "0123456789abcdef")  # a newer checkout's code
    run_steps(tiny_params("push.min_accuracy=0", "filter.max_token_length=999", model=str(tiny_decoder)), project,
              "push")
    text = card.read_text()
    filter_settings = json.loads(text[text.index("```json") + 7:text.index("```", text.index("```json") + 7)])["filter"]
    assert filter_settings == {"max_prompt_token_length": 32, "max_token_length": 64, "policy": "drop"}
    assert "Not claimed reproducible from this commit: " in text
    assert "the model was trained by other training code" in text
    assert "Reproduce: check out the commit" not in text


def test_a_card_without_dvc_claims_no_reproduction_where_the_data_steps_code_changed(tmp_path, tiny_decoder,
                                                                                     monkeypatch):
    """Without DVC only the training code was compared: a commit whose download code made other pairs was
    said to remake the model (a fresh clone of it gave other data and other weights)."""
    from rm_lib.pipeline import code_version

    params = tiny_params("train.max_steps=2", "push.min_accuracy=0", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    committed_project(tmp_path, monkeypatch)
    run_steps(params, tmp_path, "push")
    card = Layout(tmp_path).release / "README.md"
    assert "Reproduce: check out the commit" in card.read_text()
    # beside the data, not in the manifests later stages depend on (an edit making the same data retrained)
    assert code_version.recorded_code(Layout(tmp_path).pairs) == code_version.code_hash("download")
    assert all("code_hash" not in json.loads((folder / "manifest.json").read_text())
               for folder in (Layout(tmp_path).pairs, Layout(tmp_path).tokenized, Layout(tmp_path).filtered))
    real = code_version.code_hash
    monkeypatch.setattr(code_version, "code_hash", lambda step: "0" * 16 if step == "download" else real(step))
    run_steps(params, tmp_path, "push")
    text = card.read_text()
    assert "Reproduce: check out the commit" not in text
    assert "its data were made by other code of download than this checkout holds" in text
    # evaluate's code edited, run, and put back before push: the figures are no commit's (they were claimed)
    monkeypatch.setattr(code_version, "code_hash", real)
    run_steps(params, tmp_path, "push")
    assert "Reproduce: check out the commit" in card.read_text()
    (Layout(tmp_path).evaluation / "code.json").write_text(json.dumps({"step": "evaluate", "code_hash": "0" * 16}))
    run_steps(params, tmp_path, "push")
    text = card.read_text()
    assert "Reproduce: check out the commit" not in text
    assert "its evaluation (the figures above and the release gate's verdict) was made by other evaluate code" in text
    # the project in a folder of the code's own checkout, whose code was edited: its `git status` saw nothing
    from rm_lib.publish import model_card

    write_json(Layout(tmp_path).evaluation / "code.json", {"step": "evaluate", "code_hash": real("evaluate")})
    monkeypatch.setattr(model_card, "code_checkout", lambda *args: {
        "code_untracked": [], "code_changed": True, "code_elsewhere": None, "code_commit": None})
    run_steps(params, tmp_path, "push")
    text = card.read_text()
    assert "(with uncommitted changes)" in text and "Reproduce: check out the commit" not in text


def test_hundreds_of_subsets_keep_the_summary_the_gate_and_the_card_readable(tmp_path):
    """One subset per generator or prompt (hundreds): evaluate's summary was one line of 18,000 characters
    (names with line breaks split it), the gate listed every failing subset, and its text, written raw into
    the card's table, ended the table; the card's evaluation table had a row per subset."""
    from pathlib import Path

    from rm_lib.publish import model_card
    from rm_lib.settings import PushSettings
    from rm_lib.steps.evaluate import EvaluateResult

    odd = " | a\nb"  # a name from the data: a cell separator and a line break
    per_subset = {f"gen {i:03d}{odd if i % 7 == 0 else ''}": {"pairs": 10, "accuracy": (i % 50) / 50}
                  for i in range(120)}
    metrics = {"pairs": 1200, "accuracy": 0.5, "tie_rate": 0.0, "longer_wins_baseline": 0.5,
               "shorter_wins_baseline": 0.4, "loss": 0.69, "prefers_longer": 0.5, "reward_length_correlation": 0.1,
               "calibration_ece": 0.1, "per_subset": per_subset, "data_hash": "h"}
    summary = EvaluateResult(metrics, Path("report.json"), Path("."), {}).summary()
    first = summary.splitlines()[0]
    assert "the 8 least accurate of 120 subsets; gen 000 | a b 0.0000; gen 050 0.0000; gen 100 0.0000;" in first
    assert first.endswith("; +112 more in report.json), loss 0.6900") and len(first) < 500

    layout = Layout(tmp_path)
    write_json(layout.evaluation / "report.json", metrics)
    gate = quality.evaluation_gate(layout, PushSettings(min_accuracy=0.0, min_test_pairs=1, min_subset_accuracy=0.9))
    verdict = next(v for v in gate if v.name == "subset_gate")
    assert not verdict.passed and "\n" not in verdict.description
    assert "110 of 120 subsets below the minimum 0.9000" in verdict.description
    assert verdict.description.endswith(", and 102 more (report.json)")
    table = model_card._gate([{"check": v.name, "passed": v.passed, "description": v.description} for v in gate],
                             forced=True).split("| check | result | detail |\n|---|---|---|\n")[1].strip()
    assert all(line.startswith("| ") and line.endswith(" |") for line in table.splitlines())
    assert len(table.splitlines()) == len(gate)

    evaluation = model_card._evaluation(metrics, [])
    rows = [line for line in evaluation.splitlines() if line.startswith("| accuracy on ")]
    assert len(rows) == model_card.SUBSET_ROWS + 1
    assert rows[-1] == "| accuracy on the other 90 subsets (above: the 30 least accurate) | in `evaluation.json` |"


def test_the_gate_benchmark_measures_what_the_readme_says_of_the_rules():
    """benchmarks/bench_gate.py (BENCHMARKS.md, README "The release gate"): below 90% shared the gate refuses
    an equally good model rarely where the strict rule on the shared pairs refuses it often, and catches a
    2-point drop on a grown source more often than the rule of reports without `correct`."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_gate.py"), "--trials", "100"], cwd=root,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {(cells[0].strip().split(" (")[0], cells[1].strip()): [int(c.strip().rstrip("%")) for c in cells[2:]]
            for line in out.splitlines() if line.startswith("| ") and "%" in line
            for cells in [line.strip().strip("|").split("|")]}
    assert len(rows) == 16
    for scenario in ("source grown by 15%", "another seed"):
        whole, strict, gate = rows[(scenario, "0.80")]
        assert gate <= 10 and strict >= 30, (scenario, whole, strict, gate)
    whole, strict, gate = rows[("source grown by 15%", "0.78")]
    assert gate > whole + 15, (whole, gate)
    assert rows[("another seed", "0.70")][2] >= 90  # 0.70 against 0.80: refused
