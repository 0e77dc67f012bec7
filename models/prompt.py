"""The one prompt builder: chat messages, or token ids with images, into the Prompt an engine runs; and, for the
pair, the chat template split around a question, where its stages put their instructions.

Everything is checked before any image is decoded: the messages' structure, the ids, each image's size (read from
its header) and the token count, which the caller may refuse (`fits`) before the pixels are decoded.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tandem.models.errors import CheckpointError, InputError
from tandem.models.image import ImageProcessorConfig, image_digest, image_size, image_tokens, load_image, smart_resize
from tandem.models.positions import mrope_positions
from tandem.models.tokenizer import Tokenizer, build_prompt_ids, expand_image_pads, extract_images, validate_messages

Messages = list[dict] | str  # chat messages, or one user message's text
TokenIds = list[int] | torch.Tensor | np.ndarray  # one 1-D sequence of integer ids


@dataclass
class Prompt:
    """A request ready for the model: expanded token ids, decoded images and the M-RoPE positions (built on the
    caller's thread; the device work is the engine loop's)."""

    token_ids: list[int] | torch.Tensor  # a device tensor for a pair stage's suffix (no images there)
    images: list[torch.Tensor]  # decoded uint8 [3, H, W] on the CPU, in order
    digests: list[str]  # each image's content hash: the vision cache's key
    grids: list[tuple[int, int, int]]  # (t, h, w) in patches, per image
    positions: torch.Tensor  # [3, len(token_ids)]
    rope_delta: int  # generated token i (counting the prompt) sits at position i + rope_delta
    image_tokens: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def continuing(cls, token_ids: list[int] | torch.Tensor, length: int, rope_delta: int) -> "Prompt":
        """Text ids that continue a sequence of `length` tokens (whose prompt had `rope_delta`): positions go on
        from its end, as a decode step's would."""
        start = length + rope_delta
        return cls(token_ids, [], [], [], torch.arange(start, start + len(token_ids)).expand(3, -1), rope_delta)


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, image_config: ImageProcessorConfig, image_token_id: int, vocab_size: int):
        self.tokenizer, self.image_config = tokenizer, image_config
        self.image_token_id, self.vocab_size = image_token_id, vocab_size

    def build(self, messages: Messages | None = None, token_ids: TokenIds | None = None, images: list | None = None,
              fits: Callable[[int], None] | None = None) -> Prompt:
        """Exactly one of messages / token_ids; images go with the ids (one <|image_pad|> per image, or the run
        already expanded). fits(prompt tokens) may refuse the prompt before its images are decoded."""
        if (messages is None) == (token_ids is None):
            raise InputError("pass either messages or prompt_token_ids, not both and not neither")
        if messages is not None:
            if images is not None:
                raise InputError("images go inside messages as {'type': 'image', 'image': ...} parts")
            messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
            validate_messages(messages)
            images = extract_images(messages)
        elif images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            raise InputError(f"images must be a list, got {type(images).__name__}")
        per_image = [image_tokens(*image_size(image, i), self.image_config, i) for i, image in enumerate(images)]
        if messages is not None:
            ids = build_prompt_ids(self.tokenizer, messages, per_image)
        else:
            ids = expand_image_pads(self.check_ids(token_ids), per_image, self.tokenizer.image_pad_id)
        if fits is not None:
            fits(len(ids))
        decoded = [load_image(image, i) for i, image in enumerate(images)]
        prompt = self.of(ids, decoded, [image_digest(i) for i in decoded])
        merge = self.image_config.merge_size
        if [t * h * w // merge**2 for t, h, w in prompt.grids] != per_image:
            raise InputError(f"the images decoded to other sizes than their headers said ({per_image} tokens)")
        return prompt

    def of(self, ids: list[int], images: list[torch.Tensor], digests: list[str]) -> Prompt:
        """A Prompt of expanded ids and decoded uint8 [3, H, W] images (with their digests), with its positions."""
        config, grids = self.image_config, []
        for image in images:
            height, width = smart_resize(image.shape[1], image.shape[2], config.factor, config.min_pixels,
                                         config.max_pixels)
            grids.append((1, height // config.patch_size, width // config.patch_size))
        positions, rope_delta = mrope_positions(ids, grids, self.image_token_id, config.merge_size)
        tokens = sum(t * h * w // config.merge_size**2 for t, h, w in grids)
        return Prompt(ids, images, digests, grids, positions, rope_delta, tokens)

    def split(self, question: str) -> tuple[str, str]:
        """The chat template rendered around one image and `question`: (everything up to and including the
        question, everything after it up to the assistant's turn). A pair's stages put their instructions between.

        No marker in the text (a user could type it): the question is rendered with an "a" and with a "b" after
        it, and the two renderings differ exactly where the question ends."""

        def render(text: str) -> str:
            content = [{"type": "image", "image": "image"}, {"type": "text", "text": text}]
            return self.tokenizer.render_chat([{"role": "user", "content": content}])

        a, b = render(question + "a"), render(question + "b")
        end = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        head, tail = a[:end], a[end + 1:]
        if a != head + "a" + tail or b != head + "b" + tail:
            raise CheckpointError("the chat template does not copy the user's text into the prompt verbatim, once: "
                                  "the pipeline cannot place its instructions after the question")
        return head, tail

    def check_ids(self, ids: TokenIds) -> list[int]:
        """prompt_token_ids as a list of ints: a list or tuple of ints, or a 1-D integer tensor or numpy array."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            kind = str(ids.dtype).removeprefix("torch.")
            integer = not ids.dtype.is_floating_point and not ids.dtype.is_complex if isinstance(ids, torch.Tensor) \
                else ids.dtype.kind in "iu"
            if not integer or kind == "bool":
                raise InputError(f"prompt_token_ids is a {type(ids).__name__} of {kind}: token ids are integers")
            if ids.ndim != 1:
                raise InputError(f"prompt_token_ids has shape {list(ids.shape)}: pass one sequence of ids (1-D)")
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            raise InputError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
        if not ids:
            raise InputError("prompt_token_ids is empty")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < self.vocab_size:
                raise InputError(f"prompt_token_ids[{i}] = {t!r} is not a token id in [0, {self.vocab_size})")
        return [int(t) for t in ids]
