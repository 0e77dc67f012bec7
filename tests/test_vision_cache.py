"""The vision cache: LRU within a byte bound, hit/miss counts, and the keys' image digest and tower fingerprint."""

from __future__ import annotations

import copy

import torch

from tandem.models.config import VisionConfig
from tandem.models.vision import VisionEncoder
from tandem.models.image import image_digest
from tandem.runtime.vision_cache import VisionCache, VisionFeatures, tower_fingerprint


def features(tokens: int) -> VisionFeatures:
    """tokens x 8 float32 embeds plus one DeepStack feature: 64 bytes per token."""
    return VisionFeatures(torch.zeros(tokens, 8), [torch.zeros(tokens, 8)], tokens)


def test_lru_eviction_by_bytes_and_counts():
    cache = VisionCache(max_bytes=64 * 10)
    cache.put("a", features(4))
    cache.put("b", features(4))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", features(4))  # 12 tokens > 10: evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert (cache.hits, cache.misses, len(cache), cache.bytes_used) == (3, 1, 2, 64 * 8)


def test_an_entry_larger_than_the_bound_is_not_kept():
    cache = VisionCache(max_bytes=64 * 3)
    cache.put("big", features(4))
    assert cache.get("big") is None and cache.bytes_used == 0


def test_image_digest_sees_content_and_shape():
    image = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8)
    assert image_digest(image) == image_digest(image.clone())
    changed = image.clone()
    changed[1, 2, 3] ^= 1
    assert image_digest(changed) != image_digest(image)
    assert image_digest(image.reshape(3, 6, 4)) != image_digest(image)


def test_tower_fingerprint_is_equal_exactly_for_equal_weights():
    config = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=16,
                          in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                          num_position_embeddings=16, deepstack_visual_indexes=(1,), rope_theta=1e4)
    tower = VisionEncoder(config)
    twin = copy.deepcopy(tower)
    assert tower_fingerprint(tower) == tower_fingerprint(twin)
    with torch.no_grad():
        twin.blocks[1].mlp.linear_fc2.weight[3, 5] += 1e-3
    assert tower_fingerprint(tower) != tower_fingerprint(twin)
    swapped = copy.deepcopy(tower)
    with torch.no_grad():  # the same values in another order
        swapped.pos_embed.weight.copy_(tower.pos_embed.weight.flip(0))
    assert tower_fingerprint(tower) != tower_fingerprint(swapped)
