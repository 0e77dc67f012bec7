"""M-RoPE position ids against transformers' Qwen3VLModel.get_rope_index, for mixes of text and images."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from tandem.models.positions import mrope_positions

PAD, START, END = 151655, 151652, 151653


def prompt(layout: list) -> list[int]:
    """layout: ints are text lengths, tuples (t, h, w) are images in patches."""
    ids, text = [], 1000
    for item in layout:
        if isinstance(item, int):
            ids += list(range(text, text + item))
            text += item
        else:
            t, h, w = item
            ids += [START] + [PAD] * (t * h * w // 4) + [END]
    return ids


LAYOUTS = {
    "one-square": [5, (1, 8, 8), 7],
    "wide-then-tall": [3, (1, 4, 12), 2, (1, 10, 6), 4],
    "image-first": [(1, 6, 4), 9],
    "text-only": [12],
    "adjacent-images": [2, (1, 4, 4), (1, 6, 2), 3],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_positions_and_delta_match_transformers(name):
    layout = LAYOUTS[name]
    ids = prompt(layout)
    grids = [g for g in layout if isinstance(g, tuple)]
    ours, delta = mrope_positions(ids, grids, PAD, merge_size=2)
    reference = Qwen3VLModel.get_rope_index.__get__(_RopeOnly())
    input_ids = torch.tensor([ids])
    ref, ref_delta = reference(input_ids, (input_ids == PAD).int(), torch.tensor(grids) if grids else None)
    assert torch.equal(ours, ref[:, 0])
    assert delta == int(ref_delta)


class _RopeOnly:
    """The attributes get_rope_index reads, without building a model."""

    config = Qwen3VLConfig()
    get_vision_position_ids = Qwen3VLModel.get_vision_position_ids
