"""Results schema, incremental writing, and the report command."""

import json

import pytest

from eval_suite.results import ResultsError, ResultsWriter, load_results, validate_results

MODEL = {"path": "/m/base", "name": "base", "dtype": "float32", "attn_implementation": "eager",
         "device": "cpu", "adapter": "synth"}


def task_entry(score=50.0, **extra):
    entry = {"score": score, "metric": "exact_match", "num_items": 10, "parse_failures": 1,
             "dataset_id": "eval_suite/synth_vqa", "dataset_revision": "synth-v1", "split": "test",
             "prompt_version": "synth-v1", "task_type": "visual-question-answering", "capability": "vqa"}
    entry.update(extra)
    return entry


def test_writer_rewrites_the_file_after_every_task(tmp_path):
    path = tmp_path / "out" / "results.json"
    writer = ResultsWriter(path, MODEL)
    assert json.loads(path.read_text())["tasks"] == {}
    writer.add_task("synth_vqa", task_entry(40.0))
    assert load_results(path)["tasks"]["synth_vqa"]["score"] == 40.0
    writer.add_error("synth_ocr", "RuntimeError: boom")
    data = writer.finish()
    assert data["status"] == "complete_with_errors"
    on_disk = load_results(path)
    assert on_disk["errors"] == {"synth_ocr": "RuntimeError: boom"}
    assert on_disk["suite"] == "eval_suite" and on_disk["created"].endswith("+00:00")


def test_load_results_names_the_file_and_the_missing_key(tmp_path):
    path = tmp_path / "r.json"
    data = {"suite": "eval_suite", "suite_version": "0", "created": "x", "model": dict(MODEL),
            "tasks": {"synth_vqa": task_entry()}}
    del data["tasks"]["synth_vqa"]["dataset_revision"]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"r\.json: missing key 'tasks\.synth_vqa\.dataset_revision'"):
        load_results(path)
    data["tasks"]["synth_vqa"]["dataset_revision"] = "v"
    del data["model"]["dtype"]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match="missing key 'model.dtype'"):
        load_results(path)


@pytest.mark.parametrize("bad, message", [
    ({"suite": "other"}, "'suite' is 'other'"),
    ({"tasks": []}, "'tasks' must be an object"),
])
def test_validate_rejects_wrong_types(bad, message):
    data = {"suite": "eval_suite", "suite_version": "0", "created": "x", "model": dict(MODEL), "tasks": {}}
    data.update(bad)
    with pytest.raises(ResultsError, match=message):
        validate_results(data, "f.json")


def test_validate_rejects_scores_off_the_0_100_scale():
    data = {"suite": "eval_suite", "suite_version": "0", "created": "x", "model": dict(MODEL),
            "tasks": {"t": task_entry(score=0.71 * 1000)}}
    with pytest.raises(ResultsError, match="must be a number in \\[0, 100\\]"):
        validate_results(data, "f.json")


def test_load_results_missing_or_broken_file(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        load_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(tmp_path / "bad.json")


def test_report_writes_markdown_and_png(tmp_path):
    from eval_suite.cli import main

    paths = []
    for name, scores in (("base", (40.0, 10.0)), ("merged", (55.0, 30.0))):
        writer = ResultsWriter(tmp_path / f"{name}.json", {**MODEL, "name": name})
        writer.add_task("synth_vqa", task_entry(scores[0]))
        writer.add_task("synth_ocr", task_entry(scores[1], metric="exact_match", capability="ocr"))
        writer.finish()
        paths.append(str(tmp_path / f"{name}.json"))
    assert main(["report", *paths, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| merged | 55.00 | 30.00 | 42.50 |" in text
    assert "| base | 40.00 | 10.00 | 25.00 |" in text
    png = (tmp_path / "report" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_an_invalid_file(tmp_path, capsys):
    from eval_suite.cli import main

    (tmp_path / "bad.json").write_text(json.dumps({"suite": "eval_suite"}))
    assert main(["report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r")]) == 2
    assert "bad.json: missing key 'suite_version'" in capsys.readouterr().err
