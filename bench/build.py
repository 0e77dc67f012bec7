"""What the parts of `tandem bench` run: transformers' Qwen3-VL with random weights and Tandem's engine on the same
weights (build_models), and the inputs (seeded text ids and images, the forced-length greedy sampling)."""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.models.config import parse_config
from tandem.models.image import ImageProcessorConfig
from tandem.models.loader import load_model_from_state_dict
from tandem.models.qwen3_vl import Qwen3VL
from tandem.models.tiny import GENERATION_CONFIG, PRESETS, perturb_weights
from tandem.models.tokenizer import Tokenizer
from tandem.runtime.config import DEFAULT_PAGE_SIZE, EngineConfig
from tandem.runtime.engine import Engine
from tandem.runtime.kv_cache import PagePool
from tandem.runtime.sampling import SamplingParams, checkpoint_defaults

QUESTION = "What is the main object in this picture, and what color is it?"
TEXT_ID_LIMIT = 151643  # ids below this are ordinary byte-pair tokens (no special or image-pad id)
PAD_ID = GENERATION_CONFIG["pad_token_id"]


@dataclass
class Built:
    preset: str
    engine: Engine
    hf: Any  # transformers' Qwen3VLForConditionalGeneration with the same weights, or None once dropped
    parameters: int
    weight_bytes: int
    decode_weight_bytes: int


def build_models(preset: str, device: torch.device, dtype: torch.dtype, seed: int, files: Path, kv_tokens: int,
                 kernel_backend: str | None = None, keep_hf: bool = True) -> Built:
    """transformers' model with random weights, built on `device` in `dtype`, and Tandem's Engine on the same weights."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device, _default_dtype(dtype):
        torch.manual_seed(seed)
        hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(PRESETS[preset])))
        perturb_weights(hf)
    if any(p.dtype != dtype for p in hf.parameters()):  # every parameter was created in `dtype`; this is a guard
        hf = hf.to(dtype)
    hf = hf.eval().requires_grad_(False)  # buffers (rotary inv_freq) stay float32, as from_pretrained leaves them
    hf.generation_config.eos_token_id = None  # forced lengths, as Tandem's ignore_eos
    hf.generation_config.pad_token_id = PAD_ID
    config = parse_config(hf.config.to_dict())
    model = load_model_from_state_dict(config, hf.state_dict(), device, dtype)
    defaults, eos_ids = checkpoint_defaults(files)
    pool = PagePool(config.text, -(-kv_tokens // DEFAULT_PAGE_SIZE) + 2, DEFAULT_PAGE_SIZE, device, dtype)
    engine = Engine(model, Tokenizer.from_pretrained(files), ImageProcessorConfig.from_checkpoint(files), pool,
                    defaults, eos_ids, EngineConfig(kernel_backend=kernel_backend))
    parameters = sum(p.numel() for p in model.parameters())
    built = Built(preset, engine, hf if keep_hf else None, parameters,
                  sum(p.numel() * p.element_size() for p in model.parameters()), decode_weight_bytes(model))
    if not keep_hf:
        del hf
        free_memory(device)
    return built


def decode_weight_bytes(model: Qwen3VL) -> int:
    """Bytes of weights one decode step reads: the text decoder (layers, final norm), the output head and one
    embedding row (a tied head is the embedding table, read whole as the head)."""
    tied = model.config.tie_word_embeddings
    total = sum(p.numel() * p.element_size() for name, p in model.language_model.named_parameters()
                if tied or not name.startswith("embed_tokens."))
    if not tied:
        head = model.lm_head.weight
        total += head.numel() * head.element_size() + head.shape[1] * head.element_size()
    return total


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- inputs ------------------------------------------------------------------------------------------------------
def forced_greedy(tokens: int) -> SamplingParams:
    """Exactly `tokens` greedy tokens: every timed or profiled Tandem generation decodes a forced length."""
    return SamplingParams(max_tokens=tokens, temperature=0.0, top_p=1.0, top_k=0, ignore_eos=True)


def text_ids(n: int, seed: int) -> list[int]:
    """n seeded random ordinary-token ids (no special or image-pad id)."""
    return torch.randint(0, TEXT_ID_LIMIT, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def bench_image(size: int, seed: int) -> np.ndarray:
    """A square HWC uint8 image with structure (gradients) and seeded noise: other seed, other pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // max(size - 1, 1), y * 255 // max(size - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)


def image_question(image: np.ndarray) -> list[dict]:
    """The one-image request of the first-token measurements: the image and QUESTION in one user turn."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
