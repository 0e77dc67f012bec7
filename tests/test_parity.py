"""Tandem's Qwen3-VL against transformers' own Qwen3VLForConditionalGeneration, float32 on the CPU.

The reference side is built independently of Tandem's code: pixels from transformers' Qwen2VLImageProcessorPil,
prompt ids from transformers' tokenizer on the Qwen3-VL chat format written out literally.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

from tandem.models.prompt import Prompt
from tandem.runtime import Engine, SamplingParams
from tandem.runtime.sampling import gumbel_noise, seed_key

from conftest import random_image

IMAGE_PAD = 151655
GREEDY_TOKENS = 32

# name: (checkpoint fixture, image sizes (h, w), question)
CASES = {
    "2b-two-images": ("tiny_2b", [(300, 250), (200, 420)], "What differs between the two pictures?"),
    "2b-text-only": ("tiny_2b", [], "Tell me a short story about a cat."),
    "8b-one-image": ("tiny_8b", [(256, 330)], "What is in this image?"),
    "8b-two-images": ("tiny_8b", [(420, 200), (260, 260)], "Which picture is brighter?"),
}


class Case:
    """One prompt, prepared both ways: Tandem's engine and transformers' reference."""

    def __init__(self, checkpoint, sizes, question):
        self.engine = Engine.from_pretrained(checkpoint, device="cpu", dtype="float32")
        self.reference = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.images = [random_image(h, w, seed=h * 7 + w) for h, w in sizes]
        self.question = question
        self.messages = [{"role": "user", "content": [{"type": "image", "image": a} for a in self.images]
                          + [{"type": "text", "text": question}]}]
        processor = Qwen2VLImageProcessorPil(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            size={"shortest_edge": 65536, "longest_edge": 16777216},
        )
        self.ref_inputs = processor([Image.fromarray(a) for a in self.images], return_tensors="pt") if sizes else {}
        grids = self.ref_inputs["image_grid_thw"].tolist() if sizes else []
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.ids = self.prompt_ids([t * h * w // 4 for t, h, w in grids])
        self.unexpanded_ids = self.prompt_ids([1] * len(grids))

    def prompt_ids(self, pads_per_image: list[int]) -> list[int]:
        vision = "".join("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in pads_per_image)
        text = f"<|im_start|>user\n{vision}{self.question}<|im_end|>\n<|im_start|>assistant\n"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def reference_kwargs(self, ids: list[int]) -> dict:
        input_ids = torch.tensor([ids])
        return dict(input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE_PAD).int(), **self.ref_inputs)


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> Case:
    fixture, sizes, question = CASES[request.param]
    return Case(request.getfixturevalue(fixture), sizes, question)


def test_prompt_ids_match_reference(case):
    assert case.engine.prepare(case.messages).token_ids == case.ids


def test_prefill_logits_match_transformers(case):
    ours = case.engine.prompt_logits(case.engine.prepare(case.messages))
    with torch.no_grad():
        ref = case.reference(**case.reference_kwargs(case.ids)).logits[0]
    assert ours.shape == ref.shape
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-4 * scale


def test_greedy_tokens_match_transformers_generate(case):
    ours = case.engine.generate(case.messages, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0))
    with torch.no_grad():
        ref = case.reference.generate(**case.reference_kwargs(case.ids), max_new_tokens=GREEDY_TOKENS,
                                      do_sample=False, temperature=None, top_p=None, top_k=None)
    expected = ref[0, len(case.ids):].tolist()
    assert len(expected) == GREEDY_TOKENS  # the tiny models do not stop early, so all 32 steps are compared
    assert ours.token_ids == expected
    assert ours.finish_reason == "length"


def test_cached_decode_equals_full_recompute(case):
    """Tokens decoded one at a time through the KV cache equal the argmax of one uncached pass over them all."""
    out = case.engine.generate(case.messages, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True))
    full = case.ids + out.token_ids[:-1]
    logits = case.engine.prompt_logits(case.engine.prepare(None, full, [a for a in case.images]))
    assert logits[len(case.ids) - 1:].argmax(-1).tolist() == out.token_ids


def test_messages_equal_prompt_token_ids(case):
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    from_messages = case.engine.generate(case.messages, sampling)
    from_ids = case.engine.generate(prompt_token_ids=case.unexpanded_ids, images=case.images, sampling=sampling)
    assert from_ids.token_ids == from_messages.token_ids
    assert from_ids.text == from_messages.text


def test_short_chunks_after_the_prompt_match_transformers(case):
    """Where decode steps replay CUDA graphs, a chunk of at most 16 text tokens runs as one decode-shaped step, one
    row per token (the runner's short chunks; forced here on the CPU): after the prompt in the cache, chunks of 1,
    3, 5 and 16 tokens give the logits transformers gives for those positions of the whole sequence. Every cache
    slot no sequence holds is NaN first: a row that reads past its own tokens turns its logits into NaN."""
    engine = case.engine
    assert engine.pool.pages_in_use == 0 and engine.runner.chunk_rows == 0
    engine.runner.chunk_rows = 16
    engine.pool.kv[:, :, [p for p in range(engine.pool.num_pages) if p != engine.pool.scratch_page]] = float("nan")
    prompt = engine.prepare(case.messages)
    seq = engine.submit_prefix(prompt).result().seq
    extra = torch.randint(0, engine.model.config.text.vocab_size, (25,), generator=torch.Generator().manual_seed(7))
    ours, start = [], 0
    try:
        for n in (1, 3, 5, 16):
            chunk = Prompt.continuing(extra[start : start + n].tolist(), seq.length, prompt.rope_delta)
            ours.append(engine.submit_verify(seq, chunk).result().logits)
            start += n
    finally:
        engine.release(seq)
        engine.runner.chunk_rows = 0
    assert engine.runner._chunk_buffers  # the rows ran
    with torch.no_grad():
        ref = case.reference(**case.reference_kwargs(case.ids + extra.tolist())).logits[0, len(case.ids):]
    ours = torch.cat(ours)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert engine.pool.pages_in_use == 0


def test_token_logits_are_the_weights_each_token_was_drawn_from(case):
    """A sampled generation that keeps its token logits (a sampled speculation's draft): row i holds, inside the
    top-k of the logits transformers gives at the position that drew token i (the prefill's last one, then each
    decode step's), those logits over the temperature, and -inf elsewhere; and token i is exactly the draw the
    sampler's noise for step i makes from that row. Beside it, submitted at once (sharing steps where they meet),
    the same request not keeping them draws the same tokens."""
    engine = case.engine
    prompt = engine.prepare(case.messages)
    params = engine.resolve(SamplingParams(max_tokens=6, temperature=1.5, top_k=4, top_p=1.0, seed=5,
                                           ignore_eos=True))
    plain = engine.submit_stage(None, prompt, params)
    kept = engine.submit_stage(None, prompt, params, token_logits=True).result()
    assert plain.result().token_ids == kept.token_ids and plain.result().logits is None
    tokens, vocab = kept.token_ids, engine.model.config.text.vocab_size
    with torch.no_grad():
        ref = case.reference(**case.reference_kwargs(case.ids + tokens[:-1])).logits[0, len(case.ids) - 1 :]
    assert kept.logits.shape == ref.shape == (6, vocab)
    inside = kept.logits.isfinite()
    top = torch.zeros_like(inside).scatter_(1, ref.topk(4, dim=-1).indices, True)
    assert torch.equal(inside, top)
    assert (kept.logits[inside] * 1.5 - ref[inside]).abs().max() <= 1e-4 * ref.abs().max()
    for i, token in enumerate(tokens):
        noise = gumbel_noise(torch.tensor([seed_key(5)]), torch.tensor([i]), torch.arange(vocab)[None])[0]
        assert (kept.logits[i] + noise).argmax().item() == token
    assert engine.pool.pages_in_use == 0


def test_pages_return_after_each_request(case):
    case.engine.generate(case.messages, SamplingParams(max_tokens=4, temperature=0.0))
    assert case.engine.pool.pages_in_use == 0
