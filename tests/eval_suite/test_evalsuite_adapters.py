"""Adapters on tiny random checkpoints built offline (they generate garbage: we test plumbing,
batching, prompt formatting and the recorded settings)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from eval_suite.adapters import ADAPTERS, AdapterError, Request, detect_adapter, load_adapter

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def _build(family, directory):
    from mergekit_mllm.testing.vlm import build_vlm

    template = {"qwen2_vl": QWEN_TEMPLATE, "qwen2_5_vl": QWEN_TEMPLATE, "internvl": INTERNVL_TEMPLATE,
                "llava": LLAVA_TEMPLATE, "internvl_chat": None}[family]
    path = build_vlm(family, directory, chat_template=template)
    _align_token_ids(path, family)
    if family == "internvl":  # InternVL-hf tokenizers name their image tokens
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["extra_special_tokens"] = {"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
        config_file.write_text(json.dumps(config))
        processor = {"processor_class": "InternVLProcessor", "image_seq_length": 1}
        (path / "processor_config.json").write_text(json.dumps(processor))
        image_config = json.loads((path / "preprocessor_config.json").read_text())
        image_config.update(size={"height": 28, "width": 28}, crop_to_patches=False)
        (path / "preprocessor_config.json").write_text(json.dumps(image_config))
    if family == "llava":  # the fixture's image processor keeps CLIP's 224 px; the tower is 28 px
        image_config = json.loads((path / "preprocessor_config.json").read_text())
        image_config.update(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        (path / "preprocessor_config.json").write_text(json.dumps(image_config))
    if family == "internvl_chat":
        config = json.loads((path / "config.json").read_text())
        config["force_image_size"] = 56
        (path / "config.json").write_text(json.dumps(config))
    return path


def _align_token_ids(path: Path, family: str) -> None:
    """Point the config's image-token ids at the tokenizer's tokens for that family."""
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    config = json.loads((path / "config.json").read_text())
    if family in ("qwen2_vl", "qwen2_5_vl"):
        config.update(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
                      vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    elif family == "llava":
        config.update(image_token_index=vocab["<image>"], image_token_id=vocab["<image>"])
    elif family == "internvl":
        config.update(image_token_id=vocab["<IMG_CONTEXT>"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: _build(family, root / family) for family in ("qwen2_vl", "qwen2_5_vl", "llava", "internvl", "internvl_chat")}


def _requests(n=5):
    sizes = [(60, 40), (30, 50), (56, 56), (40, 40), (70, 30)]
    return [Request("w1 w2 w3", Image.new("RGB", sizes[i % 5], (40 * i, 0, 0)), max_new_tokens=3) for i in range(n)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "internvl", "internvl_chat"])
def test_adapter_generates_in_batches(tiny_models, family, monkeypatch):
    from eval_suite.adapters.hf import Qwen2VLAdapter

    # keep the tiny models' inputs small (the default is VLMEvalKit's 256·28² … 1280·28² budget)
    monkeypatch.setattr(Qwen2VLAdapter, "min_pixels", 28 * 28 * 4)
    monkeypatch.setattr(Qwen2VLAdapter, "max_pixels", 28 * 28 * 16)
    path = tiny_models[family]
    assert detect_adapter(path) == family
    adapter = load_adapter(path, batch_size=2, progress=False)
    calls = []
    original = adapter._generate_batch
    monkeypatch.setattr(adapter, "_generate_batch", lambda batch: calls.append(len(batch)) or original(batch))
    outputs = adapter.generate(_requests(5))
    assert calls == [2, 2, 1]
    assert len(outputs) == 5 and all(isinstance(o.text, str) for o in outputs)
    info = adapter.describe()
    assert info["dtype"] == "float32" and info["attn_implementation"] == "eager" and info["device"] == "cpu"
    assert info["adapter"] == family and info["decoding"] == "greedy"
    if family == "qwen2_5_vl":  # grounding needs the processed image size
        assert all(o.info["input_width"] % 28 == 0 and o.info["input_height"] % 28 == 0 for o in outputs)


def test_batched_and_single_generation_agree(tiny_models):
    adapter = load_adapter(tiny_models["llava"], batch_size=4, progress=False)
    requests = _requests(4)
    batched = [o.text for o in adapter.generate(requests)]
    adapter.batch_size = 1
    single = [o.text for o in adapter.generate(requests)]
    assert batched == single  # left padding keeps greedy decoding identical


def test_missing_directory_and_unknown_adapter(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(AdapterError, match="no adapter for model_type 'bert'"):
        detect_adapter(tmp_path / "m")
    with pytest.raises(AdapterError, match="unknown adapter"):
        load_adapter(tmp_path / "m", "nope")
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(AdapterError, match="not valid JSON"):
        detect_adapter(tmp_path / "m")


def test_cuda_request_without_cuda_is_a_clear_error(tiny_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(AdapterError, match="CUDA is not available"):
        load_adapter(tiny_models["llava"], device="cuda")


def test_dtype_choice_is_recorded(tiny_models):
    adapter = load_adapter(tiny_models["llava"], dtype="bfloat16", progress=False)
    assert adapter.describe()["dtype"] == "bfloat16"
    assert next(adapter.model.parameters()).dtype.__repr__() == "torch.bfloat16"
    assert set(ADAPTERS) >= {"qwen2_vl", "qwen2_5_vl", "llava", "internvl", "internvl_chat", "synth"}


def test_internvl_dynamic_tiling():
    from eval_suite.adapters.internvl_chat import dynamic_preprocess, tiles_to_tensor

    wide = dynamic_preprocess(Image.new("RGB", (896, 448)), max_num=6, image_size=448)
    assert len(wide) == 3  # 2×1 tiles + thumbnail
    square = dynamic_preprocess(Image.new("RGB", (100, 100)), max_num=6, image_size=448)
    assert len(square) == 1  # one tile, no thumbnail
    assert tiles_to_tensor(wide, 448).shape == (3, 3, 448, 448)
