"""The benchmark harness measures what it says (no timing assertions here)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import kernels, report, whole_merge
from benchmarks.baselines import autograd_descent, padded_projectors
from benchmarks.common import GIB, save_json
from mergekit_mllm.ops.interference import optmerge_problem, reference_interference_descent, wudi_problem


def vectors(shape=(14, 9), experts=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn((experts, *shape), generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(14, 9), (9, 14)])
def test_autograd_baseline_is_the_same_iteration_as_the_reference(shape):
    # The baseline we time is the objective's own autograd iteration: expert
    # by expert backward and the authors' zero-padded projectors change
    # neither the loss nor the iterates.
    tv = vectors(shape)
    for problem, settings in (
        (wudi_problem(tv), dict(optimizer="adam", lr=1e-3, iterations=20)),
        (optmerge_problem(tv, variant="lora", rank_fraction=1 / 3), dict(optimizer="sgd", lr=1e-1, iterations=20, momentum=0.9)),
        (optmerge_problem(tv, variant="full", rank_fraction=1 / 3), dict(optimizer="adam", lr=1e-3, iterations=20)),
    ):
        expected = reference_interference_descent(problem, **settings)
        padded = padded_projectors(problem)
        assert all(p.shape == tv.shape[1:] for p in padded.projectors)
        torch.testing.assert_close(padded.loss(problem.init), problem.loss(problem.init), rtol=1e-12, atol=0)
        torch.testing.assert_close(autograd_descent(problem, **settings), expected, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(autograd_descent(padded, **settings), expected, rtol=1e-10, atol=1e-13)


def test_kernel_measurement_records_every_method():
    results = kernels.measure((12, 8), 2, torch.device("cpu"), throughput=1e9, budget=60.0, log=lambda _: None)
    expected = {
        "task_arithmetic", "weight_average", "ties_merging", "dare_task_arithmetic", "dare_ties_merging",
        "task_arithmetic.again",
        "wudi.ours", "wudi.autograd", "optmerge_lora.problem", "optmerge_lora.ours",
        "optmerge_lora.ours_gram_steps", "optmerge_lora.autograd_unpadded", "optmerge_lora.autograd",
        "optmerge_exact", "optmerge_full.problem", "optmerge_full.ours", "optmerge_full.autograd",
        "swudi", "aswudi", "wudi_exact",
    }
    assert set(results) == expected
    for name, result in results.items():
        assert result["seconds"] > 0, name
    for name in ("wudi.ours", "optmerge_full.ours", "wudi.autograd"):
        extrapolated = results[name]
        assert extrapolated["extrapolated"] and extrapolated["timed_iterations"] >= 1
        assert extrapolated["seconds"] >= kernels.ITERATIONS * extrapolated["per_iteration"]
    # an over-budget baseline is skipped, with its estimate
    skipped = kernels._time_autograd_steps(
        wudi_problem(vectors().float()), "adam", 1e-5, 0.0, torch.device("cpu"), budget=1e-9, throughput=1.0
    )
    assert "skipped" in skipped


def test_cpu_plan_puts_the_headline_first_and_covers_n_5_for_every_shape():
    plan = kernels.default_plan(torch.device("cpu"))
    assert (plan[0][1], plan[0][2]) == kernels.TARGET
    assert {shape for _, shape, n in plan[:4] if n == 5} == set(kernels.SHAPES.values())
    gpu_plan = kernels.default_plan(torch.device("cuda"))
    assert {n for _, _, n in gpu_plan} == set(range(2, 9)) and len(gpu_plan) == 4 * 7


def test_child_peak_rss_is_per_child(tmp_path):
    # Each merge gets its own peak: RUSAGE_CHILDREN of this process would report
    # the largest child so far for every later one, and a child forked from
    # this (large) process would inherit its high-water mark.
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"1" * len(ballast[::4096])
    allocate = "import time; x = bytearray({size}); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.3)"
    big = whole_merge.run_child([sys.executable, "-c", allocate.format(size=400 * 2**20)], tmp_path / "big.log")
    small = whole_merge.run_child([sys.executable, "-c", allocate.format(size=10 * 2**20)], tmp_path / "small.log")
    assert big["returncode"] == 0 and small["returncode"] == 0
    assert big["peak_rss_bytes"] >= 400 * 2**20
    assert small["peak_rss_bytes"] < 100 * 2**20
    # the polled anonymous peak sees the allocation too (it lasts ≥ 0.1 s)
    assert big["peak_anon_bytes"] >= 400 * 2**20 > small["peak_anon_bytes"]
    del ballast


def test_synthetic_checkpoint_and_its_largest_tensor(tmp_path):
    family = whole_merge.build_family(whole_merge.QUICK, tmp_path, experts=2)
    name, nbytes = whole_merge.largest_tensor_bytes(family["base"])
    spec = whole_merge.QUICK
    assert name in ("model.embed_tokens.weight", "lm_head.weight")
    assert nbytes == spec.vocab * spec.hidden * 2  # bfloat16
    from mergekit_mllm.testing import state_dict

    base, expert = state_dict(family["base"]), state_dict(family["experts"][0])
    assert base.keys() == expert.keys()
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], expert["model.layers.0.mlp.up_proj.weight"])


def test_report_renders_saved_results(tmp_path):
    entry = {"label": "gate_proj, up_proj", "shape": [18944, 3584], "experts": 5, "results": {}}
    for key in ("wudi.ours", "optmerge_full.ours", "optmerge_lora.ours_gram_steps"):
        entry["results"][key] = {"seconds": 30.0, "per_iteration": 0.1, "setup": 0.0, "extrapolated": True}
    for key in ("wudi.autograd", "optmerge_lora.autograd", "optmerge_full.autograd", "optmerge_lora.autograd_unpadded"):
        entry["results"][key] = {"seconds": 300.0, "per_iteration": 1.0, "extrapolated": True}
    entry["results"]["optmerge_lora.ours"] = {"seconds": 3.0, "per_iteration": 0.01, "extrapolated": False}
    entry["results"]["task_arithmetic"] = {"seconds": 1.0, "extrapolated": False}
    entry["results"]["swudi"] = {"skipped": "eigendecomposition too large"}
    environment = {"device": "cpu", "torch": "x", "cpu_count": 2, "torch_threads": 2, "started": "now",
                   "load_average_at_start": [1.0, 1.0, 1.0], "cpu_model": "test"}
    save_json("kernels_cpu", {"section": "kernels", "environment": environment, "entries": [entry]}, tmp_path)
    save_json("merge_cpu", {
        "section": "merge", "environment": environment, "experts": 5,
        "checkpoints": {"streaming": {"spec": {"layers": 2, "hidden": 8, "intermediate": 16, "vocab": 10, "dtype": "bfloat16"},
                                      "model_bytes": GIB, "largest_tensor": "lm_head.weight",
                                      "largest_tensor_bytes": 2**20, "rss_bound_bytes": 2 * GIB}},
        "runs": [
            {"method": "task_arithmetic", "label": "task_arithmetic", "checkpoint": "streaming", "out_shard_size": None,
             "seconds": 10.0, "peak_rss_bytes": GIB, "peak_anon_bytes": GIB, "within_rss_bound": True, "returncode": 0},
            {"method": "weight_average", "label": "weight_average", "checkpoint": "streaming", "out_shard_size": None,
             "seconds": 12.0, "peak_rss_bytes": 4 * GIB, "peak_anon_bytes": 3 * GIB, "within_rss_bound": False, "returncode": 0},
        ],
    }, tmp_path)
    out = report.write(tmp_path / "RESULTS.md", results_dir=tmp_path)
    text = out.read_text()
    assert "| WUDI: Gram-form Adam step vs autograd step | 100 ms | 1.0 s | 10.0× ✅ | ≥ 10× |" in text
    assert "100.0×" in text  # spectral ÷ 300 against the autograd step
    assert "| weight_average | 12.0 s | 1.2× | 3.00 GiB | **no** | 4.00 GiB | 0 |" in text
    assert "skipped" in text and "No GPU was lent" in text
    assert (tmp_path / "kernels_cpu.png").exists() and (tmp_path / "merge_cpu.png").exists()


def test_closed_form_scores_pair_each_closed_form_with_its_iterative_method():
    from benchmarks.closed_form_scores import render

    methods = {"wudi (Adam, 300 steps)": ("wudi", {}), "wudi_exact": ("wudi_exact", {}), "swudi": ("swudi", {}),
               "optmerge full (Adam, 300 steps)": ("optmerge", {"variant": "full"}),
               "optmerge_exact full": ("optmerge_exact", {"variant": "full"})}

    def family(name, scores):
        return {"family": f"/x/{name}", "rows": [{"label": k, "method": methods[k][0], "parameters": methods[k][1],
                                                  "test_average": v, "lambda": 0.3} for k, v in scores.items()]}

    scores = [{"wudi (Adam, 300 steps)": 55.0 + s, "wudi_exact": 52.0 + s, "swudi": 55.5 - s,
               "optmerge full (Adam, 300 steps)": 56.0, "optmerge_exact full": 56.0 + s} for s in (0.0, 0.5, 1.0)]
    data = {"val_items": 200, "test_items": 500, "families": {f"seed{i}": family(f"seed{i}", s) for i, s in enumerate(scores)}}
    text = "\n".join(render(data))
    assert "| wudi (Adam, 300 steps) − wudi_exact | +3.00, +3.00, +3.00 | +3.00 | 0.50 | yes |" in text
    assert "| wudi (Adam, 300 steps) − swudi | -0.50, +0.50, +1.50 | +0.50 | 0.50 | no |" in text
    assert "| optmerge full (Adam, 300 steps) − optmerge_exact full | +0.00, -0.50, -1.00 | -0.50 | 0.50 | no |" in text
    # iterative rows are not compared with themselves
    assert sum(line.startswith("| ") and " − " in line for line in text.splitlines()) == 3


def test_whole_merge_warms_each_fused_method_once_before_timing(monkeypatch, tmp_path):
    """Every element-wise method merges once untimed per checkpoint (its kernels compile there),
    other methods and GPU runs do not."""
    merged = []
    monkeypatch.setattr(whole_merge, "merge_once",
                        lambda run, family, workdir, device: merged.append((run.method, run.checkpoint.name))
                        or {"seconds": 1.0, "returncode": 0})
    runs = whole_merge.default_runs(quick=True) + whole_merge.wide_runs()
    families = {run.checkpoint.name: {} for run in runs}
    done = whole_merge.warm_up(runs, families, tmp_path, torch.device("cpu"), log=lambda _: None)
    expected = {(m, c) for m in whole_merge.ELEMENTWISE for c in {r.checkpoint.name for r in runs}}
    assert sorted(merged) == sorted(expected) and len(done) == len(expected)
    assert whole_merge.warm_up(runs, families, tmp_path, torch.device("meta"), log=lambda _: None) == []


def test_a_timed_merge_that_compiled_is_measured_again(monkeypatch, tmp_path):
    """A timed run whose process grew inductor's cache (it compiled) is repeated, and the
    compiling run is kept only as a record."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "ab").mkdir(parents=True)
    assert whole_merge.inductor_cache_entries() == 0
    calls = []

    def child(command, log_path):
        calls.append(command)
        if len(calls) == 1:  # the first process compiles: a new cache file
            (tmp_path / "cache" / "ab" / "graph").write_text("x")
        return {"seconds": 10.0 * len(calls), "peak_anon_bytes": 2 * GIB, "peak_rss_bytes": 3 * GIB, "returncode": 0}

    monkeypatch.setattr(whole_merge, "run_child", child)
    monkeypatch.setattr(whole_merge, "build_family", lambda spec, root: {"base": tmp_path, "experts": [tmp_path]})
    monkeypatch.setattr(whole_merge, "largest_tensor_bytes", lambda directory: ("w", 1000))
    monkeypatch.setattr(whole_merge, "checkpoint_bytes", lambda directory: 0)
    monkeypatch.setattr(whole_merge, "interpreter_rss", lambda log_dir: {})
    monkeypatch.setattr(whole_merge, "save_json", lambda name, data: None)
    monkeypatch.setattr(whole_merge, "write_recipe", lambda path, recipe: path)
    monkeypatch.setattr(whole_merge, "recipe_for", lambda *args, **kwargs: {})
    run = whole_merge.MergeRun("task_arithmetic", whole_merge.QUICK, {"weight": 1.0})
    data = whole_merge.run(torch.device("cpu"), workdir=tmp_path, runs=[run], log=lambda _: None)
    (result,) = data["runs"]
    assert len(calls) == 2 and result["seconds"] == 20.0 and not result["compiled"]
    assert result["discarded_compiling_run"]["seconds"] == 10.0


def test_repeated_merges_run_in_rounds_and_the_report_keeps_the_fastest(monkeypatch, tmp_path):
    """``--repeat 3``: every run once per round (interleaved), each result tagged with its round;
    the report gives one row per run with its fastest time (the ratio's numerator and, for
    task_arithmetic, its denominator), its largest peak RSS, and every time."""
    times = iter([10.0, 13.0, 9.0, 12.5, 11.0, 12.0])  # (TA, TIES) × 3 rounds
    order = []

    def once(run, family, workdir, device):
        order.append(run.method)
        return {"seconds": next(times), "peak_anon_bytes": (2 if run.method == "ties_merging" and len(order) == 4 else 1) * GIB,
                "peak_rss_bytes": 3 * GIB, "returncode": 0, "compiled": False}

    monkeypatch.setattr(whole_merge, "merge_once", once)
    monkeypatch.setattr(whole_merge, "build_family", lambda spec, root: {"base": tmp_path, "experts": [tmp_path]})
    monkeypatch.setattr(whole_merge, "largest_tensor_bytes", lambda directory: ("w", GIB // 4))
    monkeypatch.setattr(whole_merge, "checkpoint_bytes", lambda directory: 0)
    monkeypatch.setattr(whole_merge, "interpreter_rss", lambda log_dir: {})
    monkeypatch.setattr(whole_merge, "warm_up", lambda *args, **kwargs: [])
    saved = {}
    monkeypatch.setattr(whole_merge, "save_json", lambda name, data: saved.update({name: data}))
    runs = [whole_merge.MergeRun("task_arithmetic", whole_merge.QUICK, {"weight": 1.0}),
            whole_merge.MergeRun("ties_merging", whole_merge.QUICK)]
    data = whole_merge.run(torch.device("cpu"), workdir=tmp_path, runs=runs, log=lambda _: None, repeat=3)
    assert order == ["task_arithmetic", "ties_merging"] * 3
    assert [r["round"] for r in data["runs"]] == [0, 0, 1, 1, 2, 2] and data["repeat"] == 3
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        whole_merge.run(torch.device("cpu"), workdir=tmp_path, runs=runs, log=lambda _: None, repeat=0)
    from benchmarks.report import _merge_section

    data["checkpoints"]["quick"]["spec"] = {"layers": 2, "hidden": 8, "intermediate": 16, "vocab": 10,
                                            "dtype": "bfloat16"}
    text = "\n".join(_merge_section(data))
    assert "measured in 3 interleaved rounds" in text
    assert "| task_arithmetic | 9.0 s | 1.0× | 1.00 GiB | yes | 3.00 GiB | 0 | 10.0 s, 9.0 s, 11.0 s |" in text
    assert "| ties_merging | 12.0 s | 1.3× | 2.00 GiB | yes | 3.00 GiB | 0 | 13.0 s, 12.5 s, 12.0 s |" in text


def test_plan_selection_by_shape_and_experts():
    cpu = torch.device("cpu")
    plan = kernels.select_plan(cpu, experts=[3, 4], shapes=["3584x3584"])
    assert plan == [("q_proj, o_proj", (3584, 3584), 3), ("q_proj, o_proj", (3584, 3584), 4)]
    # shapes alone keep the device's default counts; experts alone cover every shape
    assert sorted(n for _, _, n in kernels.select_plan(cpu, shapes=["18944×3584"])) == list(kernels.CPU_LARGE_EXPERTS)
    assert {s for _, s, _ in kernels.select_plan(cpu, experts=[2])} == set(kernels.SHAPES.values())
    with pytest.raises(ValueError, match="unknown shape.*100x7"):
        kernels.select_plan(cpu, shapes=["100x7"])
    with pytest.raises(ValueError, match="--experts"):
        kernels.select_plan(cpu, experts=[0])


def test_kernels_command_refuses_bad_plans_before_measuring(capsys):
    from benchmarks.__main__ import main

    for argv, message in ((["--experts", "3,x"], "is not a comma-separated list of integers"),
                          (["--shapes", "3584x3585"], "unknown shape(s) 3584x3585"),
                          (["--experts", "0"], "every N must be at least 1")):
        with pytest.raises(SystemExit) as raised:
            main(["kernels", "--device", "cpu", "--no-report", *argv])
        assert raised.value.code == 2 and message in capsys.readouterr().err
