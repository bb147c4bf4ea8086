"""The built wheel plugs into stock mergekit in a fresh interpreter."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mergekit_mllm.methods import METHOD_NAMES
from mergekit_mllm.testing import recipe_for, state_dict, write_recipe

import oracles

pytestmark = pytest.mark.e2e


def test_wheel_contains_hook_at_top_level(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "mergekit_mllm.pth" in names and "_mergekit_mllm_hook.py" in names
    assert "mergekit_mllm/methods.py" in names


def test_hook_is_lazy_and_registers_on_mergekit_import(fresh_env):
    probe = """
import json, sys
startup = {"hook": "_mergekit_mllm_hook" in sys.modules, "torch": "torch" in sys.modules,
           "plugin": "mergekit_mllm" in sys.modules}
from mergekit import merge_methods
import mergekit_mllm
print(json.dumps({"startup": startup, "file": mergekit_mllm.__file__,
                  "methods": [m.spec.name for m in merge_methods.registered_methods()]}))
"""
    result = fresh_env.run(["-c", probe])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["startup"] == {"hook": True, "torch": False, "plugin": False}
    assert report["file"].startswith(str(fresh_env.site_packages))
    assert set(METHOD_NAMES) <= set(report["methods"])
    assert result.stderr == ""


def test_plugin_failure_is_reported_once_and_mergekit_still_works(fresh_env, tmp_path):
    # Shadow the plugin with a broken one: mergekit must still import and work.
    broken = tmp_path / "mergekit_mllm"
    broken.mkdir()
    (broken / "__init__.py").write_text("")
    (broken / "_plugin.py").write_text("raise ImportError('simulated breakage')\n")
    probe = "from mergekit import merge_methods; import mergekit.merge; print(len(merge_methods.registered_methods()))"
    result = fresh_env.run(["-c", probe], env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 20  # mergekit's own methods are there
    assert result.stderr.count("mergekit-mllm: plugin failed to load") == 1
    assert "simulated breakage" in result.stderr


def test_doctor_reports_active_hook(fresh_env):
    result = fresh_env.run(["-m", "mergekit_mllm.cli", "doctor", "--json"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hook_active"] and not report["methods_missing"] and report["hook_error"] is None
    assert report["fused_kernels"].startswith(("auto: CPU tensors of >= 262,144 entries", "auto, but the C++ compiler"))


def _expected(method, base, experts):
    if method == "weight_average":
        return oracles.weight_average(base, experts)
    if method == "iso_c":
        return oracles.iso_c(base, experts)
    if method == "tsv":
        return oracles.tsv(base, experts)
    return None


@pytest.mark.parametrize("method", ["optmerge", "weight_average", "iso_c"])
def test_stock_mergekit_yaml_runs_our_methods(fresh_env, qwen2_family, tmp_path, method):
    recipe = write_recipe(
        tmp_path / "recipe.yml", recipe_for(method, qwen2_family["base"], qwen2_family["experts"])
    )
    out = tmp_path / "out"
    result = fresh_env.run([fresh_env.script("mergekit-yaml"), str(recipe), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    merged, base = state_dict(out), state_dict(qwen2_family["base"])
    experts = [state_dict(e) for e in qwen2_family["experts"]]
    assert set(merged) == set(base)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = _expected(method, base[name].double(), [e[name].double() for e in experts])
    if expected is not None:
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[name], base[name])


def test_stock_mergekit_multi_runs_every_method(fresh_env, qwen2_family, tmp_path):
    documents = []
    for method in list(METHOD_NAMES) + ["task_arithmetic"]:
        recipe = recipe_for(method, qwen2_family["base"], qwen2_family["experts"])
        if method in ("wudi", "optmerge"):
            recipe["parameters"] = {"iterations": 20}
        if method == "task_arithmetic":
            recipe["parameters"] = {"weight": 1.0, "lambda": 0.3}
        # mergekit-multi treats any string equal to a merge name as a model path,
        # so merges must not be named like their method.
        documents.append({"name": f"merged_{method}", **recipe})
    recipe_path = tmp_path / "multi.yml"
    recipe_path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    result = fresh_env.run(
        [fresh_env.script("mergekit-multi"), str(recipe_path), "--intermediate-dir", str(tmp_path / "merges")]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    base = state_dict(qwen2_family["base"])
    outputs = {}
    for method in list(METHOD_NAMES) + ["task_arithmetic"]:
        merged = state_dict(tmp_path / "merges" / f"merged_{method}")
        assert set(merged) == set(base), method
        outputs[method] = merged["model.layers.0.self_attn.q_proj.weight"]
    # every method produced its own result
    distinct = {tuple(t.flatten()[:8].tolist()) for t in outputs.values()}
    assert len(distinct) == len(outputs)


@pytest.mark.parametrize("method", ["ties_merging", "dare_ties_merging"])
def test_stock_mergekit_yaml_with_fused_kernels_equals_eager(fresh_env, qwen2_family, tmp_path, method):
    """MERGEKIT_MLLM_COMPILE=1 forces the fused kernels (by default only tensors of
    ≥ 262 144 entries use them): the merged checkpoint is the eager one, tensor for tensor."""
    import os

    recipe = write_recipe(tmp_path / "recipe.yml", recipe_for(method, qwen2_family["base"], qwen2_family["experts"]))
    outputs = {}
    # "no compiler": an empty inductor cache and a C++ compiler that fails → one warning, eager result
    # (the default backend, ahead-of-time packages; the suite's other tests use torch.compile)
    fused = {"MERGEKIT_MLLM_COMPILE": "1", "MERGEKIT_MLLM_COMPILE_BACKEND": "aot"}
    # the TIES pass: the native kernel, required (the installed package holds its source and builds it)
    fused["MERGEKIT_MLLM_NATIVE"] = "1"
    no_compiler = {**fused, "MERGEKIT_MLLM_NATIVE": "auto", "CXX": "/bin/false", "CC": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for mode, extra in (("fused", fused), ("eager", {"MERGEKIT_MLLM_COMPILE": "0"}), ("no_compiler", no_compiler)):
        out = tmp_path / f"out_{mode}"
        result = fresh_env.run([fresh_env.script("mergekit-yaml"), str(recipe), str(out)], env={**os.environ, **extra})
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.count("fused kernels unavailable") == (1 if mode == "no_compiler" else 0)
        outputs[mode] = state_dict(out)
    assert set(outputs["fused"]) == set(outputs["eager"]) == set(state_dict(qwen2_family["base"]))
    for name, tensor in outputs["eager"].items():
        assert torch.equal(outputs["fused"][name], tensor), name
        assert torch.equal(outputs["no_compiler"][name], tensor), name
