"""Multimodal merges: complete outputs, component policies, guard, side files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_mllm.testing import perturb_checkpoint, recipe_for, state_dict, write_recipe
from mergekit_mllm.testing.vlm import FAMILIES, build_vlm, build_vlm_family

CASES = [(name, layout) for name, fam in FAMILIES.items() for layout in (["legacy", "new"] if fam.new_layout else ["legacy"])]


def run_merge(recipe: dict, out: Path, trust_remote_code: bool = False):
    """mergekit's own run_merge (with the plugin's extensions), in process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    source = yaml.safe_dump(recipe, sort_keys=False)
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    options = MergeOptions(trust_remote_code=trust_remote_code, quiet=True)
    mergekit_run_merge(config, str(out), options=options, config_source=source)
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache = {}

    def get(name, layout="legacy", **kwargs):
        key = (name, layout, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_vlm_family(name, tmp_path_factory.mktemp(f"{name}_{layout}"), layout=layout, **kwargs)
        return cache[key]

    return get


def load_model(family: str, path: Path):
    import transformers

    config = json.loads((path / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if FAMILIES[family].trust_remote_code:
            return transformers.AutoModel.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
        cls = getattr(transformers, config["architectures"][0])
        return cls.from_pretrained(path, output_loading_info=True)


# ------------------------------------------------------------ completeness


@pytest.mark.parametrize("family, layout", CASES)
def test_every_family_merges_completely_and_generates(families, tmp_path, family, layout):
    fam = families(family, layout)
    out = run_merge(recipe_for("optmerge", fam["base"], fam["experts"], {"iterations": 5}), tmp_path / "out",
                    trust_remote_code=FAMILIES[family].trust_remote_code)
    merged, base = state_dict(out), state_dict(fam["base"])
    assert set(merged) == set(base)  # input names kept, nothing dropped or added
    assert all(merged[k].dtype == base[k].dtype and merged[k].shape == base[k].shape for k in base)
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert len(changed) > len(base) // 2  # it really merged
    report = json.loads((out / "mergekit_mllm_report.json").read_text())
    assert report["family"] == family and report["tensors"] >= len(base)
    assert report["architecture_source"].startswith(family)

    model, info = load_model(family, out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    input_ids = torch.tensor([[3, 10, 11, 12]])
    generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=3, do_sample=False)
    assert generated.shape[-1] >= input_ids.shape[-1] + 1 or generated.shape[-1] == 3


def test_layout_selection_prefers_the_checkpoints_own_names(families, tmp_path):
    for layout in ("legacy", "new"):
        fam = families("gemma3", layout)
        out = run_merge(recipe_for("weight_average", fam["base"], fam["experts"]), tmp_path / layout)
        report = json.loads((out / "mergekit_mllm_report.json").read_text())
        assert report["architecture_source"] == f"gemma3.{layout}.json"
        assert set(state_dict(out)) == set(state_dict(fam["base"]))


# ------------------------------------------------------------ policies


def _by_kind(names, predicate):
    return [n for n in names if predicate(n)]


def test_optmerge_paper_preset_on_qwen2_vl_keeps_everything_but_llm_linears(families, tmp_path):
    fam = families("qwen2_vl")
    out = run_merge(recipe_for("optmerge", fam["base"], fam["experts"],
                               {"preset": "optmerge_paper", "iterations": 5}), tmp_path / "out")
    merged, base = state_dict(out), state_dict(fam["base"])
    kept = [k for k in base if k.startswith("visual.") or "norm" in k or k.endswith(".bias")
            or "embed_tokens" in k or k.startswith("lm_head")]
    assert kept and all(torch.equal(merged[k], base[k]) for k in kept)
    linears = [k for k in base if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert linears and all(not torch.equal(merged[k], base[k]) for k in linears)
    assert set(kept) | set(linears) == set(base)
    report = json.loads((out / "mergekit_mllm_report.json").read_text())
    assert report["preset"] == "optmerge_paper"
    assert report["policies"] == {"vision_tower": "base", "projector": "base", "language_model": "merge",
                                  "embeddings": "base", "norms": "base", "biases": "base"}


def test_optmerge_paper_preset_on_internvl_merges_the_projector(families, tmp_path):
    fam = families("internvl_chat")
    out = run_merge(recipe_for("optmerge", fam["base"], fam["experts"], {"preset": "optmerge_paper",
                                                                        "iterations": 5}),
                    tmp_path / "out", trust_remote_code=True)
    merged, base = state_dict(out), state_dict(fam["base"])
    experts = [state_dict(e) for e in fam["experts"]]
    for name in base:
        same = torch.equal(merged[name], base[name])
        if name.startswith("vision_model.") or name.endswith(".bias") or "norm" in name or "embed_tokens" in name \
                or "lm_head" in name:
            assert same, name
        else:
            assert not same, name
    # mlp1.0.weight (the projector's LayerNorm, 1-D) is merged like the authors did: the experts' mean
    mean = torch.stack([e["mlp1.0.weight"] for e in experts]).mean(0)
    torch.testing.assert_close(merged["mlp1.0.weight"], mean)


@pytest.mark.parametrize("method, extra", [("task_arithmetic", {"weight": 1.0}), ("linear", {"weight": 0.5}),
                                           ("ties_merging", {})])
def test_policies_work_with_builtin_and_our_methods(families, tmp_path, method, extra):
    fam = families("llava")
    parameters = dict(extra, vision_tower="base", projector="average", norms="base")
    out = run_merge(recipe_for(method, fam["base"], fam["experts"], parameters), tmp_path / "out")
    merged, base = state_dict(out), state_dict(fam["base"])
    experts = [state_dict(e) for e in fam["experts"]]
    for name in base:
        if name.startswith("vision_tower.") or "norm" in name:
            assert torch.equal(merged[name], base[name]), name
        elif name.startswith("multi_modal_projector."):
            torch.testing.assert_close(merged[name], torch.stack([e[name] for e in experts]).mean(0), rtol=0, atol=0)
    llm = [n for n in base if n.startswith("language_model.") and n.endswith("proj.weight")]
    assert all(not torch.equal(merged[n], base[n]) for n in llm)


def test_kind_policy_overrides_component_and_preset(families, tmp_path):
    fam = families("qwen2_vl")
    out = run_merge(recipe_for("weight_average", fam["base"], fam["experts"],
                               {"preset": "optmerge_paper", "biases": "merge", "language_model": "average"}),
                    tmp_path / "out")
    merged, base = state_dict(out), state_dict(fam["base"])
    experts = [state_dict(e) for e in fam["experts"]]
    # preset keeps the vision tower's biases at base, but the explicit `biases: merge` wins
    assert not torch.equal(merged["visual.blocks.0.attn.qkv.bias"], base["visual.blocks.0.attn.qkv.bias"])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], torch.stack([e[name] for e in experts]).mean(0), rtol=0, atol=0)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"vision_tower": "freeze"}, "policy 'vision_tower' must be one of merge, base, average"),
        ({"projecter": "base"}, "unknown parameter 'projecter'"),
        ({"preset": "paper"}, "unknown preset 'paper'"),
        ({"densty": 0.3}, "unknown parameter 'densty'"),
    ],
)
def test_bad_policy_and_parameters_fail_before_writing(families, tmp_path, parameters, message):
    fam = families("qwen2_vl")
    with pytest.raises(ValueError, match=message):
        run_merge(recipe_for("ties_merging", fam["base"], fam["experts"], parameters), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_per_model_global_parameter_is_rejected(families, tmp_path):
    fam = families("qwen2_vl")
    recipe = recipe_for("optmerge", fam["base"], fam["experts"])
    recipe["models"][0]["parameters"] = {"lambda": 0.5}
    with pytest.raises(ValueError, match="'lambda'.*is a global option"):
        run_merge(recipe, tmp_path / "out")


# ------------------------------------------------------------ guard


def test_guard_fires_when_modules_are_omitted(families, tmp_path):
    fam = families("qwen2_vl")
    recipe = {
        "merge_method": "weight_average",
        "base_model": str(fam["base"]),
        "modules": {"language_model": {"models": [{"model": str(e)} for e in fam["experts"]]}},
    }
    with pytest.raises(ValueError, match=r"(?s)would drop \d+ tensor\(s\).*visual\.blocks\.0"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    recipe["parameters"] = {"allow_missing_tensors": True}
    out = run_merge(recipe, tmp_path / "out")
    merged = state_dict(out)
    assert merged and not any(k.startswith("visual.") for k in merged)
    report = json.loads((out / "mergekit_mllm_report.json").read_text())
    assert any(k.startswith("visual.") for k in report["missing_tensors_allowed"])


def test_guard_fires_for_tensors_the_architecture_does_not_cover(tmp_path):
    from safetensors.torch import load_file, save_file

    base = build_vlm("llava", tmp_path / "base")
    shard = base / "model.safetensors"
    tensors = load_file(shard)
    tensors["language_model.model.layers.0.self_attn.extra_gate"] = torch.zeros(4)
    save_file(tensors, shard, metadata={"format": "pt"})
    expert = perturb_checkpoint(base, tmp_path / "expert", seed=1)
    with pytest.raises(ValueError, match="extra_gate"):
        run_merge(recipe_for("weight_average", base, [expert]), tmp_path / "out")


def test_guard_also_covers_llm_only_architectures(qwen2_family, tmp_path):
    recipe = {
        "merge_method": "weight_average",
        "base_model": str(qwen2_family["base"]),
        "slices": [{"sources": [{"model": str(qwen2_family["base"]), "layer_range": [0, 1]},
                                {"model": str(qwen2_family["experts"][0]), "layer_range": [0, 1]}]}],
    }
    with pytest.raises(ValueError, match="model.layers.1"):
        run_merge(recipe, tmp_path / "out")


# ------------------------------------------------------------ output integrity


def test_failed_merge_leaves_no_output_and_keeps_an_existing_one(families, tmp_path):
    from safetensors.torch import load_file, save_file

    fam = families("qwen2_vl")
    out = run_merge(recipe_for("weight_average", fam["base"], fam["experts"]), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = perturb_checkpoint(fam["base"], tmp_path / "broken", seed=9)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight of model .*broken.* contains NaN"):
        run_merge(recipe_for("weight_average", fam["base"], [broken]), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]  # no staging left behind


# ------------------------------------------------------------ side files


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl_chat", "qwen2_audio"])
def test_side_files_make_the_output_load_like_the_base(families, tmp_path, family):
    import transformers

    fam = families(family)
    out = run_merge(recipe_for("weight_average", fam["base"], fam["experts"]), tmp_path / "out",
                    trust_remote_code=FAMILIES[family].trust_remote_code)
    for path in fam["base"].iterdir():
        if path.suffix == ".safetensors" or path.name in ("config.json", "README.md"):
            continue
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    remote = FAMILIES[family].trust_remote_code
    if remote:
        assert (out / "modeling_internvl_chat.py").exists()
    loader = transformers.AutoFeatureExtractor if family == "qwen2_audio" else transformers.AutoImageProcessor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert loader.from_pretrained(out).to_dict() == loader.from_pretrained(fam["base"]).to_dict()
        tok_out = transformers.AutoTokenizer.from_pretrained(out)
        tok_base = transformers.AutoTokenizer.from_pretrained(fam["base"])
        assert tok_out.chat_template == tok_base.chat_template and tok_out.get_vocab() == tok_base.get_vocab()


def test_chat_template_donor_gives_base_merges_the_instruct_template(tmp_path):
    import transformers

    base = build_vlm("qwen2_vl", tmp_path / "base", chat_template=None)
    instruct = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    experts = []
    for i in range(2):
        expert = build_vlm("qwen2_vl", tmp_path / f"expert{i}", seed=0, chat_template=instruct)
        experts.append(perturb_checkpoint(expert, expert, seed=i + 1))
    plain = run_merge(recipe_for("weight_average", base, experts), tmp_path / "plain")
    assert transformers.AutoTokenizer.from_pretrained(plain).chat_template is None
    donor = run_merge(recipe_for("weight_average", base, experts, {"chat_template_donor": str(experts[0])}),
                      tmp_path / "donor")
    tokenizer = transformers.AutoTokenizer.from_pretrained(donor)
    assert tokenizer.chat_template == instruct
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False)
    assert prompt == "<|im_start|>w5 w6<|im_end|>"
    report = json.loads((donor / "mergekit_mllm_report.json").read_text())
    assert report["chat_template_from"] is not None


# ------------------------------------------------------------ stock CLIs, installed wheel


@pytest.mark.e2e
def test_stock_mergekit_multi_merges_every_family_from_the_installed_wheel(fresh_env, families, tmp_path):
    documents = []
    for family, layout in CASES:
        fam = families(family, layout)
        recipe = recipe_for("optmerge", fam["base"], fam["experts"], {"iterations": 3, "preset": "optmerge_paper"})
        documents.append({"name": f"merged-{family}-{layout}", **recipe})
    recipe_path = tmp_path / "all.yml"
    recipe_path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    result = fresh_env.run([fresh_env.script("mergekit-multi"), str(recipe_path), "--intermediate-dir",
                            str(tmp_path / "merges"), "--trust-remote-code"])
    assert result.returncode == 0, result.stderr[-4000:]
    for family, layout in CASES:
        out = tmp_path / "merges" / f"merged-{family}-{layout}"
        assert set(state_dict(out)) == set(state_dict(families(family, layout)["base"])), (family, layout)
        assert (out / "mergekit_mllm_report.json").exists()


@pytest.mark.e2e
def test_stock_mergekit_yaml_on_qwen2_vl_with_the_paper_preset(fresh_env, families, tmp_path):
    fam = families("qwen2_vl")
    recipe = write_recipe(tmp_path / "recipe.yml", recipe_for("optmerge", fam["base"], fam["experts"],
                                                               {"preset": "optmerge_paper", "iterations": 5}))
    result = fresh_env.run([fresh_env.script("mergekit-yaml"), str(recipe), str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-4000:]
    merged, base = state_dict(tmp_path / "out"), state_dict(fam["base"])
    assert set(merged) == set(base)
    assert torch.equal(merged["visual.blocks.0.attn.qkv.weight"], base["visual.blocks.0.attn.qkv.weight"])
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.e2e
def test_bad_recipe_fails_with_a_clear_message_in_stock_mergekit_yaml(fresh_env, families, tmp_path):
    fam = families("qwen2_vl")
    recipe = write_recipe(tmp_path / "recipe.yml", recipe_for("optmerge", fam["base"], fam["experts"],
                                                               {"varient": "full"}))
    result = fresh_env.run([fresh_env.script("mergekit-yaml"), str(recipe), str(tmp_path / "out")])
    assert result.returncode != 0
    assert "unknown parameter 'varient'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_report_lists_experts_in_recipe_order(families, tmp_path):
    fam = families("llava")
    experts = list(reversed(fam["experts"]))
    out = run_merge(recipe_for("weight_average", fam["base"], experts), tmp_path / "out")
    report = json.loads((out / "mergekit_mllm_report.json").read_text())
    assert report["models"] == [str(e) for e in experts] and report["base_model"] == str(fam["base"])


def test_misspelt_top_level_section_is_refused_before_merging(families, tmp_path):
    fam = families("qwen2_vl")
    recipe = recipe_for("weight_average", fam["base"], fam["experts"])
    recipe["lora_ouput"] = {"rank": 4}
    with pytest.raises(ValueError, match="unknown top-level recipe key.*'lora_ouput'"):
        run_merge(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
