"""The vision cache: vision-tower outputs keyed by image content and tower weights, bounded by bytes, LRU.

Two requests about the same image, or two models whose towers have identical weights, encode it once. The key
is (image digest, preprocessing settings, tower fingerprint), so a different resize or a different tower never
reuses an entry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable

import torch
from torch import nn

from tandem.runtime.engine import VisionFeatures


def image_digest(image: torch.Tensor) -> str:
    """Content hash of a decoded uint8 [3, H, W] image (shape included: same bytes, other shape, other image)."""
    h = hashlib.sha256(str(tuple(image.shape)).encode())
    h.update(image.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


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
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, VisionFeatures] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable) -> VisionFeatures | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, features: VisionFeatures) -> None:
        """Store, evicting least recently used entries until it fits; an entry larger than the bound is not kept."""
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
