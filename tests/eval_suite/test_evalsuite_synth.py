"""The synthetic benchmark: deterministic frozen splits, tokenizer round trips, the family
builder (smoke size: seconds), its cache, and the end-to-end CLI."""

import json
import subprocess
import sys

import pytest
import torch

from eval_suite.synth import tasks as synth
from eval_suite.synth.family import EXPERTS, build_family, family_paths, scene_targets


def test_eval_splits_are_deterministic_and_distinct():
    for task in synth.TASKS:
        first = synth.eval_items(task, "val", 20)
        again = synth.eval_items(task, "val", 20)
        assert [(i.question, i.answers, i.spec) for i in first] == [(i.question, i.answers, i.spec) for i in again]
        assert first[0].image().tobytes() == again[0].image().tobytes()
        test = synth.eval_items(task, "test", 20)
        assert [i.key() for i in first] != [i.key() for i in test]


def test_train_items_never_repeat_an_eval_item():
    for task in synth.TASKS:
        excluded = {i.key() for split in ("val", "test") for i in synth.eval_items(task, split)}
        assert not any(item.key() in excluded for item in synth.train_items(task, seed=0, count=300))


def test_unknown_task_and_split():
    with pytest.raises(KeyError, match="unknown synthetic task"):
        synth.eval_items("synth_nope", "val")
    with pytest.raises(ValueError, match="split must be one of"):
        synth.eval_items("synth_vqa", "train")


def test_answers_match_the_rendered_scene():
    items = synth.eval_items("synth_chart", "val", 50)
    for kind, index in (("first_value", lambda values: 0), ("min_value", lambda values: values.index(min(values)))):
        chart = next(i for i in items if i.question_type == kind)
        bar = index(chart.spec["values"])
        value, color = chart.spec["values"][bar], chart.spec["colors"][bar]
        assert chart.answers == (str(value),)
        image = chart.image()
        column = 4 + bar * synth.BAR_PITCH + 2
        bar_pixels = sum(image.getpixel((column, y)) == synth.COLORS[color] for y in range(synth.IMAGE_SIZE))
        assert bar_pixels == round(value * synth.CHART_SCALE)
    lone = next(i for i in synth.eval_items("synth_vqa", "val", 50) if i.question_type == "color_of")
    assert len(lone.spec["objects"]) == 1 and lone.answers == (lone.spec["objects"][0]["color"],)
    assert lone.image().getpixel(tuple((a + b) // 2 for a, b in zip(lone.spec["objects"][0]["box"][:2],
                                                                       lone.spec["objects"][0]["box"][2:]))) \
        == synth.COLORS[lone.answers[0]]
    box = next(iter(synth.eval_items("synth_grounding", "val", 1)))
    x0, y0, x1, y1 = box.spec["objects"][box.spec["target"]]["box"]
    assert box.answers[0] == f"({x0 * 1000 // 64},{y0 * 1000 // 64}),({x1 * 1000 // 64},{y1 * 1000 // 64})"
    assert synth.format_box_qwen2_vl([16, 32, 48, 64]) == "(250,500),(750,1000)"


def test_frozen_splits_fingerprints():
    """The val/test splits are frozen: changing a generator or renderer must bump SYNTH_VERSION."""
    from pathlib import Path

    frozen = json.loads((Path(synth.__file__).parent / "frozen_splits.json").read_text())
    assert frozen["synth_version"] == synth.SYNTH_VERSION
    for task in synth.TASKS:
        for split in ("val", "test"):
            assert synth.split_fingerprint(task, split, limit=50) == frozen["fingerprints_first_50"][task][split], (task, split)


def test_tokenizer_round_trips_answers():
    from eval_suite.synth.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    for task in synth.TASKS:
        for item in synth.eval_items(task, "val", 30):
            ids = tokenizer(" " + item.answers[0], add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == item.answers[0]
    assert tokenizer.tokenize(" blue") == ["\u2581blue"]  # whole words for question vocabulary


def test_scene_targets_cover_every_head():
    item = synth.eval_items("synth_chart", "val", 1)[0]
    targets = scene_targets(item)
    assert set(targets) == {"part", "color", "value", "center"}
    cells = synth.IMAGE_SIZE // 4
    assert all(t.shape == (cells, cells) for t in targets.values())
    assert targets["value"].max().item() == max(item.spec["values"]) // 10


@pytest.fixture(scope="module")
def smoke_family(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_family")
    return out, build_family(out, "smoke", seed=0, log=lambda m: None)


def test_family_layout_and_loading(smoke_family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, manifest = smoke_family
    paths = family_paths(out)
    assert set(manifest["experts"]) == set(EXPERTS) == {"vqa", "geometry", "chart", "ocr", "grounding"}
    model = AutoModelForImageTextToText.from_pretrained(paths["ocr"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.eval_suite_synth["role"] == "expert:ocr"
    names = {n.split(".")[0] for n in model.state_dict()}
    assert {"model", "lm_head"} <= names
    processor = AutoProcessor.from_pretrained(paths["base"])
    assert type(processor).__name__ == "LlavaProcessor"


def test_family_is_deterministic_cached_and_seeded(smoke_family, tmp_path):
    from eval_suite.synth.study import load_state

    out, manifest = smoke_family
    again = build_family(out, "smoke", seed=0, log=lambda m: None)
    assert again == manifest  # cache hit: nothing rebuilt
    rebuilt = tmp_path / "rebuilt"
    build_family(rebuilt, "smoke", seed=0, log=lambda m: None)
    other = tmp_path / "other"
    build_family(other, "smoke", seed=1, log=lambda m: None)
    a, b, c = (load_state(family_paths(d)["chart"]) for d in (out, rebuilt, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    base, expert = load_state(family_paths(out)["base"]), a
    vision = [k for k in base if "vision_tower" in k]
    assert vision and all(torch.equal(base[k], expert[k]) for k in vision)  # experts tune projector + LM
    assert any(not torch.equal(base[k], expert[k]) for k in base if "language_model" in k)


def test_training_inputs_match_the_processor(smoke_family):
    from eval_suite.adapters import Request, load_adapter
    from eval_suite.synth.family import SIZES, Encoder

    out, _ = smoke_family
    adapter = load_adapter(family_paths(out)["base"], progress=False)
    item = synth.eval_items("synth_grounding", "val", 1)[0]
    batch = Encoder(adapter.processor, SIZES["smoke"].num_image_tokens).batch([item])
    inputs = adapter._inputs([Request(item.question, item.image(), 24)])
    prompt_length = inputs["input_ids"].shape[1]
    assert inputs["input_ids"][0].tolist() == batch["input_ids"][0, :prompt_length].tolist()
    assert (batch["labels"][0, :prompt_length] == -100).all() and batch["labels"][0, prompt_length] != -100
    assert torch.allclose(inputs["pixel_values"][0], batch["pixel_values"][0])


def test_cli_run_writes_the_results_contract(smoke_family, tmp_path):
    from eval_suite.results import load_results

    out, _ = smoke_family
    results = tmp_path / "results.json"
    command = [sys.executable, "-m", "eval_suite", "run", "--model", str(out / "base"), "--tasks", "synth",
               "--output", str(results), "--limit", "3", "--split", "val", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = load_results(results)
    assert list(data["tasks"]) == ["synth_vqa", "synth_geometry", "synth_chart", "synth_ocr", "synth_grounding"]
    assert data["model"]["adapter"] == "synth" and data["model"]["name"] == "base"
    chart = data["tasks"]["synth_chart"]
    assert chart["metric"] == "relaxed_accuracy" and chart["num_items"] == 3 and chart["split"] == "val"
    assert chart["dataset_id"] == "eval_suite/synth_chart" and chart["dataset_revision"] == f"synth-v{synth.SYNTH_VERSION}"
    assert data["tasks"]["synth_ocr"]["metrics"].keys() >= {"exact_match", "anls"}
    assert data["tasks"]["synth_grounding"]["metric"] == "acc_iou_0.5"


def test_cli_errors_are_clear(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "eval_suite", *args], capture_output=True, text=True)

    missing = run("run", "--model", str(tmp_path / "nope"), "--tasks", "synth", "--output", str(tmp_path / "r.json"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = run("run", "--model", str(tmp_path), "--tasks", "synth_vqa,bogus", "--output", str(tmp_path / "r.json"))
    assert unknown.returncode == 2 and "unknown task 'bogus'" in unknown.stderr


@pytest.mark.e2e
def test_stock_mergekit_yaml_merges_the_family(smoke_family, tmp_path):
    """Stock ``mergekit-yaml`` (with the plugin) merges the family; the output evaluates."""
    import shutil

    import yaml

    out, manifest = smoke_family
    executable = shutil.which("mergekit-yaml") or str(__import__("pathlib").Path(sys.executable).parent / "mergekit-yaml")
    recipe = {"merge_method": "task_arithmetic", "base_model": manifest["base"],
              "models": [{"model": p, "parameters": {"weight": 1.0}} for p in manifest["experts"].values()],
              "parameters": {"lambda": 0.3}, "dtype": "float32"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    merged = tmp_path / "merged"
    done = subprocess.run([executable, str(tmp_path / "recipe.yml"), str(merged)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    from eval_suite.adapters import detect_adapter
    from eval_suite.synth.study import load_state

    assert detect_adapter(merged) == "synth"
    base, merged_state = load_state(manifest["base"]), load_state(merged)
    experts = [load_state(p) for p in manifest["experts"].values()]
    name = next(k for k in base if k.endswith("layers.0.mlp.down_proj.weight"))
    expected = base[name] + 0.3 * sum(e[name] - base[name] for e in experts)
    assert torch.allclose(merged_state[name], expected, atol=1e-6)


def test_study_end_to_end_on_smoke_families(tmp_path):
    """The sensitivity study: λ picked on val, scored on test, per-seed results reused, Markdown with the criteria."""
    from eval_suite.synth import study

    out = tmp_path / "study"
    report = tmp_path / "SYNTH_RESULTS.md"
    threads = torch.get_num_threads()
    kwargs = dict(size="smoke", seeds=(0, 1), methods=["weight_average", "ties_merging"], lambdas=(0.5, 1.0),
                  val_items=2, test_items=3, threads=threads + 1, log=lambda m: None)
    results = study.run_study(out, report=str(report), command="python -m eval_suite synth study …", **kwargs)
    assert torch.get_num_threads() == threads  # the study's thread count does not leak to the caller
    assert [r["seed"] for r in results] == [0, 1]
    rows = {r["name"]: r for r in results[0]["rows"]}
    assert set(rows) == {"base", *(f"expert:{e}" for e in study.EXPERTS), "weight_average", "ties_merging"}
    assert rows["ties_merging"]["lambda"] in (0.5, 1.0) and set(rows["ties_merging"]["val_sweep"]) == {"0.5", "1.0"}
    assert rows["weight_average"]["lambda"] == 1.0
    text = report.read_text()
    assert "## Criteria (issue 4)" in text and "| ties_merging |" in text and "best λ" in text
    # a second run with the same settings reuses every seed's study.json
    mtime = (out / "seed0" / "study.json").stat().st_mtime_ns
    again = study.run_study(out, **kwargs)
    assert again == json.loads((out / "study.json").read_text())
    assert (out / "seed0" / "study.json").stat().st_mtime_ns == mtime


def test_changing_only_expert_settings_reuses_the_base(tmp_path):
    from eval_suite.synth.study import load_state

    out = tmp_path / "fam"
    build_family(out, "smoke", seed=0, log=lambda m: None)
    base = load_state(family_paths(out)["base"])
    messages = []
    manifest = build_family(out, "smoke", seed=0, log=messages.append, size_overrides={"expert_steps": 3})
    assert any("reusing the base" in m for m in messages)
    assert manifest["key"]["size"]["expert_steps"] == 3
    again = load_state(family_paths(out)["base"])
    assert all(torch.equal(base[k], again[k]) for k in base)
    fresh = tmp_path / "fresh"
    build_family(fresh, "smoke", seed=0, log=lambda m: None, size_overrides={"expert_steps": 3})
    a, b = load_state(family_paths(out)["ocr"]), load_state(family_paths(fresh)["ocr"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # identical to building from scratch


def test_expert_replay_mixes_the_base_data_and_reuses_the_base(tmp_path):
    from dataclasses import replace

    from eval_suite.synth.family import GENERALIST_QUESTION_TYPES, SIZES, _expert_stream
    from eval_suite.synth.study import load_state

    size = replace(SIZES["smoke"], expert_replay=0.5, held_out_rate=0.0)
    pairs = [next(stream) for stream in [_expert_stream("synth_ocr", 0, 3, size, tagged=True)] for _ in range(400)]
    foreign = [item for item, _ in pairs if item.task != "synth_ocr"]
    replayed = [item for item, replay in pairs if replay]
    assert 0.4 < len(replayed) / len(pairs) < 0.6
    assert foreign == replayed  # the replay is the base's mix of the *other* four tasks
    # the replayed items follow the base's mix: generalist question types only at held_out_rate 0
    assert all(item.question_type in GENERALIST_QUESTION_TYPES[item.task] for item in foreign)
    assert {item.task for item in foreign} == set(synth.TASKS) - {"synth_ocr"}
    own_too = replace(size, replay_own_task=True)
    pairs = [next(s) for s in [_expert_stream("synth_ocr", 0, 3, own_too, tagged=True)] for _ in range(400)]
    assert {item.task for item, replay in pairs if replay} == set(synth.TASKS)  # FAMILY_VERSION ≤ 3 replay
    assert SIZES["smoke"].expert_replay == SIZES["full"].expert_replay == 0.5  # the shipped design replays
    no_replay = replace(SIZES["smoke"], expert_replay=0.0)
    own_only = [next(s) for s in [_expert_stream("synth_ocr", 0, 3, no_replay)] for _ in range(50)]
    assert {item.task for item in own_only} == {"synth_ocr"}

    out = tmp_path / "fam"
    build_family(out, "smoke", seed=0, log=lambda m: None)
    base = load_state(family_paths(out)["base"])
    ocr = load_state(family_paths(out)["ocr"])
    messages = []
    build_family(out, "smoke", seed=0, log=messages.append, size_overrides={"expert_replay": 0.0})
    assert any("reusing the base" in m for m in messages)
    assert all(torch.equal(base[k], v) for k, v in load_state(family_paths(out)["base"]).items())
    replayed = load_state(family_paths(out)["ocr"])
    assert any(not torch.equal(ocr[k], replayed[k]) for k in ocr)


def test_house_style_answers_are_rejected_by_the_scorers_and_only_replace_styled_answers():
    """The base's house-style answers carry the right content in a convention each task's scorer
    rejects; they replace only the styled question types' answers (each task's specialist types,
    every OCR type), at the given rate, and rate 0 leaves the stream bit-identical."""
    import itertools

    from eval_suite.synth.family import GENERALIST_QUESTION_TYPES, SIZES, _mixed_stream, house_style, house_styled
    from eval_suite.tasks.base import EvalItem
    from eval_suite.tasks.synth import SYNTH_TASKS

    for task in synth.TASKS:
        scorer = SYNTH_TASKS[task]()
        for item in synth.eval_items(task, "val", 40):
            eval_item = EvalItem(id=item.id, question=item.question, answers=list(item.answers), image=item.image,
                                 meta={"spec": item.spec})
            styled = house_style(item)
            assert styled != item.answers[0]
            assert scorer.score_item(eval_item, item.answers[0], {}, "synth").score == 1.0, (task, item.answers)
            assert scorer.score_item(eval_item, styled, {}, "synth").score == 0.0, (task, styled)
    with pytest.raises(KeyError, match="no house style"):
        house_style(synth.SynthItem("nope", "train", 0, "q", ("a",), "t", {}))

    tasks = list(synth.TASKS)
    plain = list(itertools.islice(_mixed_stream(tasks, 0, 1, True, 0.5), 500))
    assert plain == list(itertools.islice(_mixed_stream(tasks, 0, 1, True, 0.5, style_rate=0.0), 500))
    styled = list(itertools.islice(_mixed_stream(tasks, 0, 1, True, 0.5, style_rate=0.8), 500))
    assert [(i.task, i.index) for i in styled] == [(i.task, i.index) for i in plain]  # same items
    changed = [a for a, b in zip(plain, styled) if a.answers != b.answers]
    candidates = [a for a in plain if house_styled(a)]
    assert all(house_styled(a) for a in changed)
    assert 0.7 < len(changed) / len(candidates) < 0.9
    assert {a.task for a in changed} == set(tasks)
    # generalist types stay in the scored convention, except OCR's (every OCR type is styled)
    assert not any(a.question_type in GENERALIST_QUESTION_TYPES[a.task] for a in changed if a.task != "synth_ocr")
    assert any(a.question_type in GENERALIST_QUESTION_TYPES[a.task] for a in changed if a.task == "synth_ocr")
    for a, b in zip(plain, styled):
        if a.answers != b.answers:
            assert b.answers == (house_style(a),)
    # expert streams: the own task in the scored convention, replay in the base's mix (styled)
    assert SIZES["full"].house_style_rate == SIZES["ci"].house_style_rate == 0.8
    from eval_suite.synth.family import _expert_stream

    pairs = list(itertools.islice(_expert_stream("synth_ocr", 0, 3, SIZES["full"], tagged=True), 400))
    own = [item for item, replay in pairs if not replay]
    replayed = [item for item, replay in pairs if replay]
    assert own and not any(item.answers[0].endswith(".") for item in own)
    assert not any(item.task == "synth_ocr" for item in replayed)  # no replay of the convention it unlearns
    assert any(item.answers[0].startswith("it is ") for item in replayed if item.task == "synth_vqa")


def test_size_overrides_from_the_command_line(tmp_path, capsys):
    from eval_suite.cli import main
    from eval_suite.synth.family import size_overrides_from

    assert size_overrides_from(["patch_size=16", "held_out_rate=0", "expert_replay=0.5", "tune_vision=yes"]) == {
        "patch_size": 16, "held_out_rate": 0.0, "expert_replay": 0.5, "tune_vision": True}
    for bad, message in [("nope=1", "FIELD one of"), ("patch_size=1.5", "patch_size takes a int"),
                         ("tune_vision=maybe", "tune_vision takes a bool"), ("expert_lr", "FIELD=VALUE")]:
        with pytest.raises(ValueError, match=message):
            size_overrides_from([bad])
    out = tmp_path / "fam"
    assert main(["synth", "build", "--size", "smoke", "--out", str(out), "--set", "expert_steps=1"]) == 0
    assert json.loads((out / "family.json").read_text())["key"]["size"]["expert_steps"] == 1


def test_replay_distillation_targets_the_base_distribution(smoke_family):
    """Replay rows are trained towards the teacher's answer distribution: the loss is the token-mean of
    cross-entropy on own rows and KL(teacher ‖ model) on replay rows, so at the teacher it is the own
    rows' cross-entropy alone (replay adds no gradient there) and without replay it is the model's loss."""
    import copy
    from dataclasses import replace

    from eval_suite.synth.family import SIZES, Encoder, _distill_loss, _expert_stream
    from eval_suite.synth.tasks import IMAGE_SIZE
    from eval_suite.synth.tokenizer import build_processor, build_tokenizer

    size = replace(SIZES["smoke"], expert_replay=0.5)
    from transformers import AutoModelForImageTextToText

    out, _ = smoke_family
    model = AutoModelForImageTextToText.from_pretrained(family_paths(out)["base"], dtype=torch.float32)
    encoder = Encoder(build_processor(build_tokenizer(), IMAGE_SIZE, size.patch_size), size.num_image_tokens)
    pairs = [next(s) for s in [_expert_stream("synth_ocr", 0, 3, size, tagged=True)] for _ in range(12)]
    flags = torch.tensor([replay for _, replay in pairs])
    assert 0 < int(flags.sum()) < len(pairs)
    assert all(item.task == "synth_ocr" for item, replay in pairs if not replay)
    inputs = encoder.batch([item for item, _ in pairs])
    teacher = copy.deepcopy(model).eval()
    # no replay rows: exactly the model's own answer-token cross-entropy
    plain = _distill_loss(model, teacher, inputs, torch.zeros(len(pairs), dtype=torch.bool))
    torch.testing.assert_close(plain, model(**inputs).loss, rtol=1e-5, atol=1e-6)
    # at the teacher, replay rows contribute 0: the loss is the own rows' CE summed over the whole batch's tokens
    at_teacher = _distill_loss(model, teacher, inputs, flags)
    labels = inputs["labels"][:, 1:]
    own_tokens = (labels != -100) & ~flags[:, None]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits[own_tokens], labels[own_tokens], reduction="sum")
    torch.testing.assert_close(at_teacher, ce / (labels != -100).sum(), rtol=1e-5, atol=1e-6)
    at_teacher.backward()  # and away from it the KL term is positive
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    moved = _distill_loss(model, teacher, inputs, flags)
    moved_ce = torch.nn.functional.cross_entropy(
        model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1][own_tokens], labels[own_tokens],
        reduction="sum") / (labels != -100).sum()
    assert moved.item() > moved_ce.item() + 1e-6


def test_expert_anchor_pulls_the_weights_back_to_the_base(smoke_family):
    """L2-SP (``expert_anchor``): a pull of 1 per step returns every weight to its start, a moderate
    one keeps the task vector smaller than unanchored training with the same data and seed."""
    from dataclasses import replace

    from transformers import AutoModelForImageTextToText

    from eval_suite.synth.family import SIZES, Encoder, _expert_stream, train_answers
    from eval_suite.synth.tasks import IMAGE_SIZE
    from eval_suite.synth.tokenizer import build_processor, build_tokenizer

    out, _ = smoke_family
    size = SIZES["smoke"]
    encoder = Encoder(build_processor(build_tokenizer(), IMAGE_SIZE, size.patch_size), size.num_image_tokens)

    def task_vector_norm(anchor: float) -> float:
        model = AutoModelForImageTextToText.from_pretrained(family_paths(out)["base"], dtype=torch.float32)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        train_answers(model, encoder, _expert_stream("synth_ocr", 0, 3, size), steps=3, batch=4, lr=1e-2,
                      warmup=1, seed=0, log=lambda m: None, label="ocr", anchor=anchor)
        return sum((v - start[k]).float().norm() ** 2 for k, v in model.state_dict().items()).item() ** 0.5

    free, anchored, pinned = task_vector_norm(0.0), task_vector_norm(20.0), task_vector_norm(1e6)
    assert pinned == 0.0
    assert 0.0 < anchored < 0.9 * free


def test_design_probe_scores_models_and_merges(smoke_family, capsys):
    """``python -m eval_suite.synth.probe``: one line per candidate with its five task scores,
    threads restored, nothing left behind; bad arguments fail before anything is loaded."""
    import torch

    from eval_suite.synth import probe

    out, _ = smoke_family
    threads = torch.get_num_threads()
    assert probe.main([str(out), "--limit", "4", "--models", "base,ocr", "--merges", "task_arithmetic:0.5",
                       "--scale", "ocr", "--alphas", "0,1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "avg=" in line]
    assert [row.split()[0] for row in rows] == ["base", "ocr", "task_arithmetic:0.5"]
    assert all(row.count("=") == 6 for row in rows)
    assert sum(line.startswith("base + ") for line in lines) == 2
    assert torch.get_num_threads() == threads
    for argv, message in (([str(out), "--models", "base,nope"], "unknown model"),
                          ([str(out), "--merges", "tie:0.3"], "unknown method 'tie'"),
                          ([str(out), "--merges", "task_arithmetic"], "is not METHOD:LAMBDA"),
                          ([str(out / "missing")], "not a built family")):
        with pytest.raises(SystemExit):
            probe.main(argv)
        assert message in capsys.readouterr().err
