"""Qwen3-VL configuration, read from a checkpoint's config.json.

Accepts both forms transformers has written: 4.x (`rope_scaling` + `rope_theta`, `torch_dtype`) and 5.x
(`rope_parameters`, `dtype`). Only the fields the model needs are kept, under one name each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.models.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    dtype: str | None  # the dtype the checkpoint was saved in, as written in config.json


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read and validate `checkpoint_dir/config.json`."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: unsupported model_type {model_type!r}; Tandem supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return parse_config(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed Qwen3-VL config ({type(e).__name__}: {e})") from e


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """A config.json's contents (or a transformers config's to_dict()) -> ModelConfig; KeyError etc. if malformed."""
    text, vision = raw["text_config"], raw["vision_config"]
    # 8B has its own lm_head; 2B/4B tie it to the embedding. transformers reads the top-level flag.
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return ModelConfig(
        text=_parse_text(text),
        vision=_parse_vision(vision),
        tie_word_embeddings=bool(tie),
        image_token_id=int(raw.get("image_token_id", 151655)),
        vision_start_token_id=int(raw.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(raw.get("vision_end_token_id", 151653)),
        dtype=raw.get("dtype", raw.get("torch_dtype", text.get("dtype", text.get("torch_dtype")))),
    )


def _parse_text(text: dict[str, Any]) -> TextConfig:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", text.get("rope_theta"))
    if rope_theta is None:
        raise KeyError("text_config has neither rope_parameters.rope_theta nor rope_theta")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"text rope_type {rope_type!r} is not supported (only 'default' M-RoPE)")
    if rope.get("mrope_interleaved", True) is not True:
        raise ValueError("non-interleaved M-RoPE (Qwen2-VL style) is not Qwen3-VL")
    section = tuple(int(s) for s in rope.get("mrope_section", (24, 20, 20)))
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} must have 3 entries summing to head_dim/2 = {head_dim // 2}")
    return TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        mrope_section=section,  # type: ignore[arg-type]
        max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
    )


def _parse_vision(vision: dict[str, Any]) -> VisionConfig:
    rope = vision.get("rope_parameters") or {}
    config = VisionConfig(
        depth=int(vision["depth"]),
        hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]),
        num_heads=int(vision["num_heads"]),
        out_hidden_size=int(vision["out_hidden_size"]),
        in_channels=int(vision.get("in_channels", 3)),
        patch_size=int(vision.get("patch_size", 16)),
        temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        num_position_embeddings=int(vision["num_position_embeddings"]),
        deepstack_visual_indexes=tuple(int(i) for i in vision.get("deepstack_visual_indexes", ())),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    if config.hidden_size % config.num_heads or config.head_dim % 4:
        raise ValueError(f"vision head_dim {config.hidden_size}/{config.num_heads} must be a whole multiple of 4")
    side = int(config.num_position_embeddings**0.5)
    if side * side != config.num_position_embeddings:
        raise ValueError(f"num_position_embeddings {config.num_position_embeddings} is not a square")
    if any(not 0 <= i < config.depth for i in config.deepstack_visual_indexes):
        raise ValueError(f"deepstack_visual_indexes {list(config.deepstack_visual_indexes)} outside depth {config.depth}")
    return config
