"""Tiny random Qwen3-VL checkpoints: they load in transformers, are deterministic, and generate non-trivially."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import tandem.models.tiny as tiny
from tandem.models.tiny import TINY_PRESETS, build_random_checkpoint, cached_tiny_checkpoint
from tandem.models.tokenizer import Tokenizer, build_prompt_ids

ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True}


@pytest.fixture(scope="module", params=TINY_PRESETS)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    preset = request.param
    return preset, build_random_checkpoint(tmp_path_factory.mktemp(preset), preset)


@pytest.fixture(scope="module")
def loaded(built: tuple[str, Path]) -> Qwen3VLForConditionalGeneration:
    return Qwen3VLForConditionalGeneration.from_pretrained(built[1]).eval()


def _tensor_names(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_files_written(built: tuple[str, Path]) -> None:
    _, folder = built
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
    } <= names
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643
    assert (generation["do_sample"], generation["temperature"], generation["top_p"], generation["top_k"]) == (
        True,
        0.7,
        0.8,
        20,
    )
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert (processor["patch_size"], processor["temporal_patch_size"], processor["merge_size"]) == (16, 2, 2)
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]
    assert processor["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert json.loads((folder / "chat_template.json").read_text()) == {"chat_template": tiny.CHAT_TEMPLATE}
    Tokenizer.from_pretrained(folder)  # real special ids, template found


def test_config_values(built: tuple[str, Path]) -> None:
    preset, folder = built
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert text["vocab_size"] == 151936 and text["head_dim"] == 32 and text["rms_norm_eps"] == 1e-6
    assert text["rope_parameters"] == ROPE
    assert config["image_token_id"] == 151655 and config["vision_start_token_id"] == 151652
    assert config["dtype"] == "float32"
    expected_vision_head_dim = {"2b-like": 16, "8b-like": 36}[preset]
    assert vision["hidden_size"] // vision["num_heads"] == expected_vision_head_dim


def test_loads_back_with_equal_weights(built: tuple[str, Path], loaded: Qwen3VLForConditionalGeneration) -> None:
    _, folder = built
    saved = load_file(folder / "model.safetensors")
    state = loaded.state_dict()
    assert saved, "no tensors saved"
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(state[name], tensor), name


def test_tied_and_untied_heads(built: tuple[str, Path], loaded: Qwen3VLForConditionalGeneration) -> None:
    preset, folder = built
    tied = preset == "2b-like"
    assert loaded.config.tie_word_embeddings is tied
    assert ("lm_head.weight" in _tensor_names(folder)) is not tied
    embed = loaded.get_input_embeddings().weight
    assert (loaded.lm_head.weight.data_ptr() == embed.data_ptr()) is tied


def test_weights_are_perturbed(built: tuple[str, Path]) -> None:
    saved = load_file(built[1] / "model.safetensors")
    norms = [n for n, t in saved.items() if t.ndim == 1 and not n.endswith("bias")]
    biases = [n for n in saved if n.endswith("bias")]
    assert any("q_norm" in n for n in norms) and any("merger.norm" in n for n in norms) and biases
    for name in norms:
        assert (saved[name] != 1).all() and 0.05 < saved[name].std() < 0.2, name
    for name in biases:
        assert (saved[name] != 0).all() and saved[name].std() > 0.05, name


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = build_random_checkpoint(tmp_path / "a", seed=3)
    second = build_random_checkpoint(tmp_path / "b", seed=3)
    other = build_random_checkpoint(tmp_path / "c", seed=4)
    data = [(p / "model.safetensors").read_bytes() for p in (first, second, other)]
    assert data[0] == data[1] != data[2]


def test_4x_config_form_loads(built: tuple[str, Path], tmp_path: Path) -> None:
    preset, folder = built
    old = build_random_checkpoint(tmp_path, preset, config_format="4.x")
    config = json.loads((old / "config.json").read_text())
    text = config["text_config"]
    assert "rope_parameters" not in text and text["rope_theta"] == 5e6
    assert text["rope_scaling"] == {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    assert config["torch_dtype"] == "float32" and "dtype" not in config
    assert "rope_parameters" not in config["vision_config"]
    assert (old / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    old_config, new_config = Qwen3VLConfig.from_pretrained(old), Qwen3VLConfig.from_pretrained(folder)
    assert old_config.text_config.rope_parameters == new_config.text_config.rope_parameters
    assert old_config.vision_config.to_dict() == new_config.vision_config.to_dict()


def test_greedy_generation_is_well_separated(built: tuple[str, Path], loaded: Qwen3VLForConditionalGeneration) -> None:
    """Greedy decoding on an image prompt: every step's top-1 beats top-2 clearly, and the tokens vary."""
    _, folder = built
    tokenizer = Tokenizer.from_pretrained(folder)
    grid = torch.tensor([[1, 6, 8]])  # 6x8 patches of 16 px, merged 2x2 into 12 tokens
    pixels = torch.rand(48, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    content = [{"type": "image", "image": "x"}, {"type": "text", "text": "Describe this picture."}]
    messages = [{"role": "user", "content": content}]
    ids = torch.tensor([build_prompt_ids(tokenizer, messages, [12])])
    out = loaded.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == tokenizer.image_pad_id).int(),  # without it transformers drops M-RoPE
        pixel_values=pixels,
        image_grid_thw=grid,
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    margins = [float(top[0] - top[1]) for top in (step[0].topk(2).values for step in out.logits)]
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    assert len(margins) == 32 and min(margins) > 1e-3
    assert len(set(tokens)) > 1


def test_unknown_preset_and_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_random_checkpoint(tmp_path, "huge")
    with pytest.raises(ValueError, match="unknown config_format"):
        build_random_checkpoint(tmp_path, config_format="3.x")


def test_cached_checkpoint_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def counting_build(path: Path, preset: str) -> Path:
        builds.append(preset)
        return build_random_checkpoint(path, preset)

    monkeypatch.setattr(tiny, "build_random_checkpoint", counting_build)
    first = cached_tiny_checkpoint()
    assert first == tmp_path / "tandem" / f"tiny-2b-like-{tiny.VERSION}"
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert cached_tiny_checkpoint() == first
    assert builds == ["2b-like"]
    assert [p.name for p in (tmp_path / "tandem").iterdir()] == [first.name]  # no staging folder left


def test_interrupted_cached_build_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def interrupted_build(path: Path, preset: str) -> Path:
        (path / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "build_random_checkpoint", interrupted_build)
    with pytest.raises(KeyboardInterrupt):
        cached_tiny_checkpoint("8b-like")
    assert list((tmp_path / "tandem").iterdir()) == []
