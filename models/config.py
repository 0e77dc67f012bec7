"""Qwen3-VL configuration, read from a checkpoint's config.json.

Accepts both forms transformers has written: 4.x (`rope_scaling` + `rope_theta`, `torch_dtype`) and 5.x
(`rope_parameters`, `dtype`). Only the fields the model needs are kept, under one name each.
"""

from __future__ import annotations

import json
import math
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
    """A config.json's contents (or a transformers config's to_dict()) -> ModelConfig. KeyError / TypeError /
    ValueError, naming the field as config.json spells it, if malformed."""
    text, vision = _section(raw, "text_config"), _section(raw, "vision_config")
    # 8B has its own lm_head; 2B/4B tie it to the embedding. transformers reads the top-level flag.
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return ModelConfig(
        text=_parse_text(text),
        vision=_parse_vision(vision),
        tie_word_embeddings=bool(tie),
        image_token_id=_int(raw, "", "image_token_id", 151655, minimum=0),
        vision_start_token_id=_int(raw, "", "vision_start_token_id", 151652, minimum=0),
        vision_end_token_id=_int(raw, "", "vision_end_token_id", 151653, minimum=0),
        dtype=raw.get("dtype", raw.get("torch_dtype", text.get("dtype", text.get("torch_dtype")))),
    )


_REQUIRED = object()


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in raw:
        raise KeyError(f"{key} is missing")
    if not isinstance(raw[key], dict):
        raise TypeError(f"{key} must be an object, got {type(raw[key]).__name__}")
    return raw[key]


def _int(section: dict[str, Any], where: str, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    """The integer field `key` of a config.json section (null counts as absent), at least `minimum`."""
    value = section.get(key)
    name = f"{where}.{key}" if where else key
    if value is None:
        if default is _REQUIRED:
            raise KeyError(f"{name} is missing")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive(section: dict[str, Any], where: str, key: str, default: Any = _REQUIRED) -> float:
    """The number field `key` of a config.json section: finite and > 0."""
    value = section.get(key)
    if value is None:
        if default is _REQUIRED:
            raise KeyError(f"{where}.{key} is missing")
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}.{key} must be a finite number > 0, got {value!r}")
    return float(value)


def _parse_text(text: dict[str, Any]) -> TextConfig:
    where = "text_config"
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise TypeError(f"{where}.rope_parameters must be an object, got {type(rope).__name__}")
    rope_theta = rope.get("rope_theta", text.get("rope_theta"))
    if rope_theta is None:
        raise KeyError("text_config has neither rope_parameters.rope_theta nor rope_theta")
    rope_theta = _positive({"rope_theta": rope_theta}, where, "rope_theta")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"text rope_type {rope_type!r} is not supported (only 'default' M-RoPE)")
    if rope.get("mrope_interleaved", True) is not True:
        raise ValueError("non-interleaved M-RoPE (Qwen2-VL style) is not Qwen3-VL")
    hidden, heads = _int(text, where, "hidden_size"), _int(text, where, "num_attention_heads")
    head_dim = _int(text, where, "head_dim", hidden // heads)
    kv_heads = _int(text, where, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"{where}.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    if head_dim % 2:
        raise ValueError(f"{where}.head_dim must be even (rotary pairs), got {head_dim}")
    section = rope.get("mrope_section", (24, 20, 20))
    if not isinstance(section, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                     for s in section):
        raise ValueError(f"mrope_section must be a list of integers >= 0, got {section!r}")
    section = tuple(section)
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} must have 3 entries summing to head_dim/2 = {head_dim // 2}")
    return TextConfig(
        vocab_size=_int(text, where, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(text, where, "intermediate_size"),
        num_layers=_int(text, where, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive(text, where, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        mrope_section=section,  # type: ignore[arg-type]
        max_position_embeddings=_int(text, where, "max_position_embeddings", 262144),
    )


def _parse_vision(vision: dict[str, Any]) -> VisionConfig:
    where = "vision_config"
    rope = vision.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise TypeError(f"{where}.rope_parameters must be an object, got {type(rope).__name__}")
    indexes = vision.get("deepstack_visual_indexes") or ()
    if not isinstance(indexes, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in indexes):
        raise ValueError(f"{where}.deepstack_visual_indexes must be a list of integers, got {indexes!r}")
    config = VisionConfig(
        depth=_int(vision, where, "depth"),
        hidden_size=_int(vision, where, "hidden_size"),
        intermediate_size=_int(vision, where, "intermediate_size"),
        num_heads=_int(vision, where, "num_heads"),
        out_hidden_size=_int(vision, where, "out_hidden_size"),
        in_channels=_int(vision, where, "in_channels", 3),
        patch_size=_int(vision, where, "patch_size", 16),
        temporal_patch_size=_int(vision, where, "temporal_patch_size", 2),
        spatial_merge_size=_int(vision, where, "spatial_merge_size", 2),
        num_position_embeddings=_int(vision, where, "num_position_embeddings"),
        deepstack_visual_indexes=tuple(indexes),
        rope_theta=_positive(rope, where, "rope_theta", 10000.0),
    )
    if config.hidden_size % config.num_heads or config.head_dim % 4:
        raise ValueError(f"vision head_dim {config.hidden_size}/{config.num_heads} must be a whole multiple of 4")
    side = math.isqrt(config.num_position_embeddings)
    if side * side != config.num_position_embeddings:
        raise ValueError(f"num_position_embeddings {config.num_position_embeddings} is not a square")
    if any(not 0 <= i < config.depth for i in config.deepstack_visual_indexes):
        raise ValueError(f"deepstack_visual_indexes {list(config.deepstack_visual_indexes)} outside depth {config.depth}")
    return config
