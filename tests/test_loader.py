"""Checkpoint loading: both config.json forms, sharded checkpoints, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLForConditionalGeneration

from tandem.models.errors import CheckpointError
from tandem.models.config import load_config
from tandem.models.loader import load_model, load_model_from_state_dict
from tandem.models.tiny import build_random_checkpoint


@pytest.fixture
def checkpoint(tiny_2b, tmp_path) -> Path:
    """A private copy of the tied tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_2b, tmp_path / "ckpt"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def rewrite(folder: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_weights_equal_transformers(tiny_8b):
    """Every parameter, fused or not, holds the checkpoint's values (q/k/v and gate/up stacked in order)."""
    ours = load_model(tiny_8b, "cpu", torch.float32)
    ref = Qwen3VLForConditionalGeneration.from_pretrained(tiny_8b, dtype=torch.float32).state_dict()
    layer = "model.language_model.layers.1"
    attn = ours.language_model.layers[1].self_attn.qkv_proj.weight
    expected = torch.cat([ref[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn, expected)
    gate_up = ours.language_model.layers[1].mlp.gate_up_proj.weight
    assert torch.equal(gate_up, torch.cat([ref[f"{layer}.mlp.gate_proj.weight"], ref[f"{layer}.mlp.up_proj.weight"]]))
    assert torch.equal(ours.lm_head.weight, ref["lm_head.weight"])
    assert torch.equal(ours.visual.blocks[2].attn.qkv.bias, ref["model.visual.blocks.2.attn.qkv.bias"])


def test_tied_model_shares_embedding(tiny_2b):
    model = load_model(tiny_2b, "cpu", torch.float32)
    assert not hasattr(model, "lm_head")
    assert model.lm_head_weight is model.language_model.embed_tokens.weight


def test_untied_model_has_its_own_head(tiny_8b):
    model = load_model(tiny_8b, "cpu", torch.float32)
    assert not torch.equal(model.lm_head_weight, model.language_model.embed_tokens.weight)


def test_dtype_conversion(tiny_2b):
    model = load_model(tiny_2b, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = tensors(tiny_2b)["model.language_model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(model.language_model.norm.weight, ref)


def test_4x_config_form_loads_the_same_model(tmp_path):
    old = load_model(build_random_checkpoint(tmp_path / "4x", "8b-like", seed=3, config_format="4.x"), "cpu", torch.float32)
    new = load_model(build_random_checkpoint(tmp_path / "5x", "8b-like", seed=3), "cpu", torch.float32)
    assert "rope_scaling" in json.loads((tmp_path / "4x" / "config.json").read_text())["text_config"]
    assert old.config == new.config
    for (name, a), (_, b) in zip(old.named_parameters(), new.named_parameters()):
        assert torch.equal(a, b), name


def test_sharded_checkpoint_equals_single_file(checkpoint, tmp_path):
    state = tensors(checkpoint)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = Path(shutil.copytree(checkpoint, tmp_path / "sharded"))
    (sharded / "model.safetensors").unlink()
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, sharded / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(checkpoint, "cpu", torch.float32), load_model(sharded, "cpu", torch.float32)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


# ---- error paths: each names the file and the tensor --------------------------------------------------------------

def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(checkpoint, "cpu", torch.float32)


def test_config_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(checkpoint, "cpu", torch.float32)


def test_unsupported_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "llava"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'llava'"):
        load_model(checkpoint, "cpu", torch.float32)


def test_malformed_config_field(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["text_config"]["hidden_size"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: malformed Qwen3-VL config.*hidden_size"):
        load_model(checkpoint, "cpu", torch.float32)


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_model(checkpoint, "cpu", torch.float32)


def test_missing_tensor(checkpoint):
    state = tensors(checkpoint)
    del state["model.language_model.layers.1.self_attn.k_proj.weight"]
    rewrite(checkpoint, state)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.language_model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(checkpoint, "cpu", torch.float32)


def test_unexpected_tensor(checkpoint):
    state = tensors(checkpoint)
    state["model.language_model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    rewrite(checkpoint, state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor\(s\) model\.language_model\.layers\.9\.mlp\.up_proj\.weight"):
        load_model(checkpoint, "cpu", torch.float32)


def test_misshaped_tensor(checkpoint):
    state = tensors(checkpoint)
    name = "model.visual.blocks.0.mlp.linear_fc1.weight"
    state[name] = state[name][:, :-1].contiguous()
    rewrite(checkpoint, state)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} has shape \[64, 31\], expected \[64, 32\]"):
        load_model(checkpoint, "cpu", torch.float32)


def test_misshaped_packed_part(checkpoint):
    state = tensors(checkpoint)
    name = "model.language_model.layers.0.mlp.gate_proj.weight"
    state[name] = state[name][:-3].contiguous()
    rewrite(checkpoint, state)
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[125, 64\]"):
        load_model(checkpoint, "cpu", torch.float32)


def test_integer_tensor(checkpoint):
    state = tensors(checkpoint)
    state["model.language_model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    rewrite(checkpoint, state)
    with pytest.raises(CheckpointError, match=r"tensor model\.language_model\.norm\.weight has dtype I32"):
        load_model(checkpoint, "cpu", torch.float32)


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        load_model(checkpoint, "cpu", torch.float32)


def test_corrupt_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        load_model(checkpoint, "cpu", torch.float32)


def test_index_names_missing_shard(checkpoint):
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors(checkpoint)}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"index\.json: lists shard model-00001-of-00002\.safetensors"):
        load_model(checkpoint, "cpu", torch.float32)


def test_malformed_index(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"no_weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json: not a safetensors index"):
        load_model(checkpoint, "cpu", torch.float32)


def test_tensor_in_two_shards(checkpoint):
    state = tensors(checkpoint)
    save_file({"model.language_model.norm.weight": state["model.language_model.norm.weight"]},
              checkpoint / "extra.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model.safetensors" for k in state} | {"model.language_model.norm.weight": "extra.safetensors"}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"tensor model\.language_model\.norm\.weight is also in"):
        load_model(checkpoint, "cpu", torch.float32)


def test_tied_checkpoint_with_identical_lm_head_loads(checkpoint):
    state = tensors(checkpoint)
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"].clone()
    rewrite(checkpoint, state)
    assert load_model(checkpoint, "cpu", torch.float32).config.tie_word_embeddings


def test_tied_checkpoint_with_different_lm_head(checkpoint):
    state = tensors(checkpoint)
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"] + 1
    rewrite(checkpoint, state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor lm_head\.weight differs from the embedding.*tie_word_embeddings=true"):
        load_model(checkpoint, "cpu", torch.float32)


def test_state_dict_of_transformers_model_loads_like_the_checkpoint(tiny_8b):
    reference = Qwen3VLForConditionalGeneration.from_pretrained(tiny_8b, dtype=torch.float32)
    from_memory = load_model_from_state_dict(load_config(tiny_8b), reference.state_dict(), "cpu", torch.float32)
    from_files = load_model(tiny_8b, "cpu", torch.float32)
    for (name, a), (_, b) in zip(from_memory.named_parameters(), from_files.named_parameters()):
        assert torch.equal(a, b), name


def test_state_dict_errors_name_the_tensor(tiny_2b):
    state = tensors(tiny_2b)
    state["model.visual.pos_embed.weight"] = state["model.visual.pos_embed.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"<state dict>: tensor model\.visual\.pos_embed\.weight has shape"):
        load_model_from_state_dict(load_config(tiny_2b), state, "cpu", torch.float32)
