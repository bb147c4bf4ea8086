"""LoRA adapter directories as merge experts: equal to merging the materialised models."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import assert_state_dicts_close, lora_report, run_merge
from mergekit_mllm.lora.inputs import LoraTensorLoader, expert_for
from mergekit_mllm.methods import METHOD_NAMES
from mergekit_mllm.ops.lowrank import LOW_RANK_KERNELS
from mergekit_mllm.testing import recipe_for, state_dict

# Few optimiser steps keep the tests fast; the kernels are the same at 300.
PARAMETERS = {
    "tsv": {"rank_fraction": 1 / 16},  # k ≤ every expert's rank: the dense TSV is well defined
    "wudi": {"iterations": 10, "lr": 1e-3},
    "optmerge": {"iterations": 10},
    "task_arithmetic": {},
}
METHODS = list(METHOD_NAMES) + ["task_arithmetic"]
# Dense Iso-C/Iso-CTS of a rank-deficient Σ τᵢ flatten the spectrum onto an
# arbitrary null-space basis: compared below on their well-defined part.
ILL_DEFINED_ON_LOW_RANK = {"iso_c", "iso_cts"}
MATRICES = 14  # 2-D, non-vocabulary weights of the tiny Qwen2 (2 layers × 7 linears)


def recipe(method, base, experts, **extra):
    parameters = dict(PARAMETERS.get(method, {}))
    result = recipe_for(method, base, experts, parameters or None, **extra)
    if method == "task_arithmetic":  # mergekit's own method requires a weight
        result["models"] = [dict(m, parameters={"weight": 1.0}) for m in result["models"]]
    return result


def merged_pair(family, method, tmp_path, **extra):
    lora = run_merge(recipe(method, family["base"], family["adapters"], **extra), tmp_path / "lora")
    materialised = run_merge(recipe(method, family["base"], family["materialised"], **extra), tmp_path / "full")
    return lora, materialised


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ILL_DEFINED_ON_LOW_RANK])
def test_lora_experts_merge_like_their_materialised_models(lora_family, tmp_path, method):
    lora, materialised = merged_pair(lora_family, method, tmp_path)
    assert_state_dicts_close(state_dict(lora), state_dict(materialised))
    report = lora_report(lora)
    assert set(report["lora_experts"]) == {str(path) for path in lora_family["adapters"]}
    if method in LOW_RANK_KERNELS:  # every weight took the factor path, no dense SVD
        assert report["low_rank_kernel_weights"] == {method: MATRICES}
    else:
        assert report["low_rank_kernel_weights"] == {}


def _range_projection(base, experts, merged, name, rtol=1e-4):
    """``merged − base`` projected onto the column and row spaces of Σ τᵢ."""
    total = sum(expert[name].double() - base[name].double() for expert in experts)
    u, s, vh = torch.linalg.svd(total)
    rank = int((s > rtol * s[0]).sum())
    assert rank < min(total.shape)  # really rank-deficient
    left, right = u[:, :rank] @ u[:, :rank].T, vh[:rank].T @ vh[:rank]
    return left @ (merged[name].double() - base[name].double()) @ right


@pytest.mark.parametrize("method", sorted(ILL_DEFINED_ON_LOW_RANK))
def test_iso_on_low_rank_experts_is_the_well_defined_part_of_the_dense_result(lora_family, tmp_path, method):
    """Dense Iso-C of a rank-R sum sets min(m, n) − R zero singular values to the
    mean too, along LAPACK's arbitrary null-space vectors. The factor form keeps
    what is defined: the dense Iso-C projected onto the row/column spaces of Σ τᵢ
    (Iso-CTS, whose common subspace covers all R directions here, reduces to it)."""
    lora = run_merge(recipe(method, lora_family["base"], lora_family["adapters"]), tmp_path / "lora")
    dense_iso_c = run_merge(recipe("iso_c", lora_family["base"], lora_family["materialised"]), tmp_path / "dense")
    base, ours, dense = state_dict(lora_family["base"]), state_dict(lora), state_dict(dense_iso_c)
    experts = [state_dict(path) for path in lora_family["materialised"]]
    for name in base:
        if base[name].ndim != 2 or "embed_tokens" in name or "lm_head" in name:
            continue
        expected = _range_projection(base, experts, dense, name)
        torch.testing.assert_close(ours[name].double() - base[name].double(), expected, atol=2e-5, rtol=1e-4)
        # the dense result is mostly that arbitrary completion
        assert float(expected.norm()) < 0.8 * float((dense[name] - base[name]).norm())
    assert lora_report(lora)["low_rank_kernel_weights"] == {method: MATRICES}


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "optmerge"])
def test_full_rank_lora_experts_match_the_dense_svd_methods_exactly(full_rank_lora_family, tmp_path, method):
    lora, materialised = merged_pair(full_rank_lora_family, method, tmp_path)
    assert_state_dicts_close(state_dict(lora), state_dict(materialised))
    assert lora_report(lora)["low_rank_kernel_weights"] == {method: MATRICES}


def test_expert_tensors_follow_peft_options(lora_family):
    """rank/alpha patterns, rsLoRA, lora_only biases, embedding LoRA and
    modules_to_save, served tensor by tensor as peft's merge_and_unload has them."""
    from mergekit.common import ModelReference

    for adapter, materialised in zip(lora_family["adapters"], lora_family["materialised"]):
        expert = expert_for(ModelReference.parse(str(adapter)))
        loader = LoraTensorLoader(expert)
        reference = state_dict(materialised)
        assert set(loader.index.tensor_paths) == set(reference)
        for name, tensor in reference.items():
            torch.testing.assert_close(loader.get_tensor(name), tensor, atol=1e-6, rtol=1e-5)
    summaries = [expert_for(ModelReference.parse(str(a))).summary() for a in lora_family["adapters"]]
    assert summaries[0]["ranks"] == [2, 4] and summaries[1]["use_rslora"]
    assert any(name.endswith("q_proj.bias") for name in summaries[1]["whole_tensors"])
    assert summaries[2]["whole_tensors"] == ["lm_head.weight"]


def test_mergekit_base_plus_adapter_syntax_reads_factors_without_materialising(lora_family, tmp_path):
    cache = tmp_path / "lora_merge_cache"
    base = lora_family["base"]
    experts = [f"{base}+{adapter}" for adapter in lora_family["adapters"]]
    plus = run_merge(recipe("weight_average", base, experts), tmp_path / "plus", lora_merge_cache=str(cache))
    full = run_merge(recipe("weight_average", base, lora_family["materialised"]), tmp_path / "full")
    assert_state_dicts_close(state_dict(plus), state_dict(full))
    assert not cache.exists() or not any(cache.iterdir())


def test_vlm_adapters_named_in_memory_map_to_the_legacy_checkpoint(qwen2_vl_lora_family, tmp_path):
    """peft writes model.language_model.layers.… for a checkpoint stored as
    model.layers.…; vision weights one expert does not adapt count as rank 0."""
    for method in ("optmerge", "ties_merging"):
        lora, materialised = merged_pair(qwen2_vl_lora_family, method, tmp_path / method)
        assert_state_dicts_close(state_dict(lora), state_dict(materialised))
    report = lora_report(tmp_path / "optmerge" / "lora")
    adapted = {key for key in state_dict(qwen2_vl_lora_family["base"])
               if key.endswith(("q_proj.weight", "v_proj.weight", "qkv.weight", "fc1.weight", "o_proj.weight",
                                "up_proj.weight"))}
    assert report["low_rank_kernel_weights"]["optmerge"] >= len(adapted)
    summary = report["lora_experts"][str(qwen2_vl_lora_family["adapters"][0])]
    assert summary["low_rank_tensors"] == 2 * 2 + 2 * 2  # LLM q/v and vision qkv/fc1, 2 layers each


# ------------------------------------------------------------ refusals


def test_dora_adapters_are_refused_by_name(qwen2_base, tmp_path):
    from mergekit_mllm.lora.testing import build_lora_expert

    dora = build_lora_expert(qwen2_base, tmp_path / "dora", seed=1, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        run_merge(recipe("weight_average", qwen2_base, [dora]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_over_another_architecture_is_refused(qwen2_base, qwen2_vl_lora_family, tmp_path):
    with pytest.raises(ValueError, match="does not have"):
        run_merge(recipe("weight_average", qwen2_base, [qwen2_vl_lora_family["adapters"][0]]), tmp_path / "out")


def test_hub_adapter_in_base_plus_adapter_syntax_downloads_only_adapter_files(lora_family, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub
    from mergekit.common import ModelReference

    calls = []

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        target = tmp_path / "snapshot"
        shutil.copytree(lora_family["adapters"][0], target, dirs_exist_ok=True)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    reference = ModelReference.parse(f"{lora_family['base']}+someone/chart-lora@v2")
    expert = expert_for(reference)
    assert calls == [("someone/chart-lora", "v2",
                      ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"))]
    assert expert.base == ModelReference.parse(str(lora_family["base"]))
    reference_tensors = state_dict(lora_family["materialised"][0])
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(LoraTensorLoader(expert).get_tensor(name), reference_tensors[name], atol=1e-6, rtol=1e-5)
