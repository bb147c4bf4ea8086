"""The main job and the λ sweep, end to end on the smoke-size synthetic family."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smoke_family(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_smoke")
    subprocess.run([sys.executable, "-m", "eval_suite", "synth", "build", "--size", "smoke", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def test_sweep_selects_lambda_on_the_validation_split(smoke_family, tmp_path):
    from mergekit_mllm.sweep import sweep_command

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "synth" / "weight_average.yml"
    text = recipe.read_text().replace("outputs/main/synth", str(smoke_family))
    (tmp_path / "weight_average.yml").write_text(text)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(sweep_command, [str(tmp_path / "weight_average.yml"), "--lambda", "0,1",
                                                "--limit", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["split"] == "val" and [p["lambda"] for p in summary["points"]] == [0.0, 1.0]
    best = max(summary["points"], key=lambda p: (p["mean"], -p["lambda"]))
    assert summary["chosen_lambda"] == best["lambda"]
    for point in summary["points"]:
        results = json.loads(Path(point["results"]).read_text())
        assert {t["split"] for t in results["tasks"].values()} == {"val"}
        assert point["mean"] == pytest.approx(sum(point["scores"].values()) / len(point["scores"]))
    chosen = yaml.safe_load((out / "chosen.yml").read_text())
    assert chosen["parameters"]["lambda"] == best["lambda"]
    assert "chosen by `mergekit-mllm sweep` on the val split" in (out / "chosen.yml").read_text()
    assert (out / "sweep.png").stat().st_size > 0 and "← chosen" in (out / "sweep.md").read_text()
    kept = [p for p in summary["points"] if (out / f"lambda_{p['lambda']:g}" / "model").exists()]
    assert [p["lambda"] for p in kept] == [best["lambda"]]  # only the chosen model is kept


def test_sweep_refuses_the_test_split(tmp_path):
    from mergekit_mllm.sweep import sweep_command

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "synth" / "optmerge.yml"
    result = CliRunner().invoke(sweep_command, [str(recipe), "--split", "test", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "never on the test split" in result.output
    assert not (tmp_path / "s").exists()


def test_main_job_merges_evaluates_and_reports(smoke_family, tmp_path):
    from mergekit_mllm.main_job import main_command

    out = tmp_path / "main"
    # the job builds into OUT/synth: reuse the smoke build (cached by its manifest)
    import shutil

    shutil.copytree(smoke_family, out / "synth")
    result = CliRunner().invoke(main_command, ["--out", str(out), "--size", "smoke", "--limit", "2",
                                               "--methods", "optmerge,task_arithmetic"])
    assert result.exit_code == 0, result.output
    assert f"leaderboard:   {out / 'leaderboard'}" in result.output
    report = (out / "leaderboard" / "report.md").read_text()
    for row in ("base", "vqa", "grounding", "optmerge", "task_arithmetic"):
        assert f"| {row} |" in report
    assert (out / "leaderboard" / "report.png").exists()
    for method in ("optmerge", "task_arithmetic"):
        merged = out / "merges" / method
        card = (merged / "README.md").read_text()
        assert "model-index" in card and "mergekit-mllm" in card and (merged / "scores.png").exists()
        assert json.loads((merged / "mergekit_mllm_report.json").read_text())["merge_method"] == method
