"""Vision features and the vision cache: tower outputs keyed by image content and tower weights, bounded by bytes,
LRU, shared by the engines of a pair.

Two requests about the same image, or two models whose towers have identical weights, encode it once. The key is
(image digest, preprocessing settings, tower fingerprint), so a different resize or a different tower never reuses
an entry. The engines' loop threads share the cache (a lock), and features encoded on one engine's CUDA stream
carry an event that the other engine's stream waits for before it reads them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import nn

from tandem.models.image import ImageProcessorConfig, preprocess_images
from tandem.models.qwen3_vl import Qwen3VL

DEFAULT_VISION_CACHE_BYTES = 1 << 30


@dataclass
class VisionFeatures:
    """The vision tower's output for some images: the rows that replace their pad tokens, in order, and the
    DeepStack features added after the first decoder layers. The unit the vision cache stores."""

    embeds: torch.Tensor  # [image tokens, hidden]
    deepstack: list[torch.Tensor]  # each [image tokens, hidden]
    tokens: int
    ready: torch.cuda.Event | None = None  # recorded after the encode, on the stream that ran it (CUDA)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))

    @classmethod
    def concat(cls, parts: list["VisionFeatures"]) -> "VisionFeatures":
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.embeds for p in parts]), [torch.cat(level) for level in zip(*(p.deepstack for p in parts))],
                   sum(p.tokens for p in parts))


@torch.inference_mode()
def tower_fingerprint(tower: nn.Module) -> str:
    """A digest of a tower's weights, computed on their device: every tensor's name, shape, dtype and two
    checksums (a plain sum and a position-weighted sum, so permuted weights differ). Identical weights give the
    same fingerprint; trained towers that differ anywhere differ here."""
    h = hashlib.sha256()
    for name, p in sorted(tower.state_dict().items()):
        flat = p.detach().flatten().double()
        ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{flat.sum().item():.17g}{(flat * ramp).sum().item():.17g}".encode())
    return h.hexdigest()


class VisionCache:
    def __init__(self, max_bytes: int = DEFAULT_VISION_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, VisionFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> VisionFeatures | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, features: VisionFeatures) -> None:
        """Store, evicting least recently used entries until it fits; an entry larger than the bound is not kept."""
        with self._lock:
            if key in self._entries or features.nbytes > self.max_bytes:
                return
            while self._bytes + features.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._entries[key] = features
            self._bytes += features.nbytes

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


def encode(model: Qwen3VL, images: list[torch.Tensor], digests: list[str], config: ImageProcessorConfig,
           cache: VisionCache | None, tower: str) -> tuple[VisionFeatures, int]:
    """The features of a prompt's images, in order: cached ones looked up, the others preprocessed and encoded in
    one pass of the tower, then cached. -> (features, how many images came from the cache). Runs on the current
    stream; a cached entry made on another stream is waited for."""
    device, dtype = model.lm_head_weight.device, model.lm_head_weight.dtype
    keys = [(digest, config, tower) for digest in digests]
    found = [cache.get(key) if cache is not None else None for key in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        inputs = preprocess_images([images[i] for i in missing], config, device, dtype)
        grids = [tuple(g) for g in inputs.grid_thw.tolist()]
        embeds, deepstack = model.visual(inputs.pixel_values, grids)
        counts = inputs.tokens_per_image
        ready = None
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        for j, (i, rows) in enumerate(zip(missing, zip(embeds.split(counts), *(d.split(counts) for d in deepstack)))):
            found[i] = VisionFeatures(rows[0], list(rows[1:]), counts[j], ready)
            if cache is not None:
                cache.put(keys[i], found[i])
    for features in found:
        if features.ready is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(features.ready)
            for t in (features.embeds, *features.deepstack):  # made on another engine's stream: an eviction
                t.record_stream(stream)  # must not hand their memory back before this stream's reads are done
    return VisionFeatures.concat(found), len(images) - len(missing)
