"""The two-model pipeline on a tiny random pair (8B-like large, 2B-like small, the real tokenizer), on the CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

from tandem.models.errors import InputError
from tandem.runtime import POLICIES, Budget, Engine, Prompts, Tandem
from tandem.runtime.answers import answers_agree

from conftest import random_image

BUDGET = Budget(short_tokens=6, reason_tokens=24)
QUESTION = "What is in this image?"
# The stages of each policy when the cheap answers disagree: (model, role) in order.
STAGES = {
    "large": [("large", "answer")],
    "small": [("small", "answer")],
    "small-reason": [("small", "reason")],
    "large-reason": [("large", "reason")],
    "transfer": [("small", "reason"), ("large", "transfer")],
    "verify": [("large", "answer"), ("small", "reason"), ("large", "transfer")],
}


@pytest.fixture(scope="module")
def engines(tiny_8b, tiny_2b):
    return (Engine.from_pretrained(tiny_8b, device="cpu", kv_cache_tokens=2048),
            Engine.from_pretrained(tiny_2b, device="cpu", kv_cache_tokens=2048))


@pytest.fixture(scope="module")
def pair(engines) -> Tandem:
    return Tandem(*engines, budget=BUDGET)


@pytest.fixture(scope="module")
def image():
    return random_image(240, 300, seed=11)


def pages_in_use(t: Tandem) -> int:
    return sum(e.pool.pages_in_use for e in t.engines.values())


def template_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("keep", ["all", "attention"])
def test_every_policy_runs_and_releases_its_pages(pair, image, policy, keep):
    result = pair.answer(image, QUESTION, policy=policy, keep=keep)
    assert [(s.model, s.role) for s in result.stages] == STAGES[policy]  # random models never agree
    assert result.answer == result.stages[-1].answer
    assert all(len(s.output_ids) >= 1 for s in result.stages)
    assert pages_in_use(pair) == 0
    data = json.loads(result.to_json())
    assert data["policy"] == policy and len(data["stages"]) == len(result.stages)
    assert data["timings"]["decode_s"] > 0  # a sum over stages, which may overlap: each fits in the total
    assert all(data["timings"]["total_s"] >= stage["timings"]["decode_s"] for stage in data["stages"])


@pytest.mark.parametrize("keep", ["all", "attention"])
def test_transfer_input_holds_the_kept_reasoning_ids_verbatim_and_in_order(pair, image, tiny_8b, keep):
    reason, transfer = pair.answer(image, QUESTION, policy="transfer", keep=keep).stages
    reasoning = reason.output_ids[:-1] if reason.output_ids[-1] in (151645, 151643) else reason.output_ids
    kept = [reasoning[i] for i in transfer.kept_indices]
    if keep == "all":
        assert kept == reasoning
    else:
        assert 0 < len(kept) < len(reasoning) and transfer.kept_indices == sorted(transfer.kept_indices)
    tokenizer = AutoTokenizer.from_pretrained(tiny_8b)
    head = template_ids(tokenizer, "\nAccording to previous thinking: ")
    tail = template_ids(tokenizer, ". Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n")
    assert transfer.suffix_ids == head + kept + tail
    # Under "transfer" this is the large model's first stage, so it also prefilled the large model's prefix.
    assert transfer.prefilled_tokens == transfer.input_tokens


def test_each_model_prefills_the_image_once_per_request(pair, image):
    before = {name: e.stats.image_prefills for name, e in pair.engines.items()}
    result = pair.answer(image, QUESTION, policy="verify")
    assert len(result.stages) == 3  # the large model runs two stages
    after = {name: e.stats.image_prefills for name, e in pair.engines.items()}
    assert after == {name: n + 1 for name, n in before.items()}
    short, _, transfer = result.stages
    assert transfer.prefilled_tokens == len(transfer.suffix_ids) < transfer.input_tokens


def test_second_request_with_the_same_image_hits_the_vision_cache(pair, image):
    other = random_image(300, 200, seed=99)
    first = pair.answer(other, QUESTION, policy="large")
    hits = pair.vision_cache.hits
    second = pair.answer(other, "How many objects are there?", policy="large")
    assert first.stages[0].vision_cache_hit is False and second.stages[0].vision_cache_hit is True
    assert pair.vision_cache.hits == hits + 1
    assert first.stages[0].prefilled_tokens > 0 and second.stages[0].timings.vision_s < first.stages[0].timings.vision_s


def test_verify_stops_after_two_stages_when_the_answers_agree(tiny_2b, image):
    """The same checkpoint on both sides, asked the same way, gives the same answer: the cheap path suffices.
    Identical towers also share one encode."""
    engine = Engine.from_pretrained(tiny_2b, device="cpu", kv_cache_tokens=2048)
    same = Prompts(reason=Prompts().short)
    t = Tandem(engine, engine, prompts=same, budget=Budget(short_tokens=6, reason_tokens=6))
    result = t.answer(image, QUESTION, policy="verify")
    assert result.agreed is True and [(s.model, s.role) for s in result.stages] == [("large", "answer"), ("small", "reason")]
    assert answers_agree(result.stages[0].text, result.stages[1].text)
    assert [s.vision_cache_hit for s in result.stages] == [False, True]
    assert 0 < result.verdict_s <= result.total_s  # agreed: the verdict is (almost) the whole request
    assert engine.pool.pages_in_use == 0


def test_verify_runs_the_transfer_stage_when_the_answers_disagree(pair, image):
    result = pair.answer(image, QUESTION, policy="verify")
    short, reason, transfer = result.stages
    assert result.agreed is False and not answers_agree(short.text, reason.text)
    assert transfer.role == "transfer" and result.answer == transfer.answer
    # The verdict came before the transfer stage, whose prefill and decode it does not include.
    assert result.verdict_s + transfer.timings.prefill_s + transfer.timings.decode_s <= result.total_s


def test_a_request_that_fails_midway_releases_every_page(tiny_8b, tiny_2b, image):
    """The large model's cache holds its prefix and short answer but not the transfer suffix: verify is refused
    before any work (a prefix is admitted only with room for its largest stage), naming the cache's numbers."""
    large = Engine.from_pretrained(tiny_8b, device="cpu", kv_cache_tokens=192)
    small = Engine.from_pretrained(tiny_2b, device="cpu", kv_cache_tokens=2048)
    t = Tandem(large, small, budget=Budget(short_tokens=6, reason_tokens=100))
    with pytest.raises(InputError, match="the prompt and the stages after it need .* tokens of KV cache"):
        t.answer(image, QUESTION, policy="verify")
    assert pages_in_use(t) == 0
    assert len(t.answer(image, QUESTION, policy="large").stages) == 1  # still usable


def test_attention_selection_matches_brute_force_attention(pair, image, tiny_2b):
    """keep="attention" keeps what plain attention probabilities, recomputed by transformers' eager attention
    from the same weights, say the reasoning tokens received from the later reasoning steps."""
    reason, transfer = pair.answer(image, QUESTION, policy="transfer", keep="attention").stages
    fed = reason.output_ids[:-1]  # every output token but the last was fed back to the model
    reasoning = len(reason.output_ids) - (reason.output_ids[-1] in (151645, 151643))
    processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})
    pixels = processor([Image.fromarray(image)], return_tensors="pt")
    t, h, w = pixels["image_grid_thw"][0].tolist()
    tokenizer = AutoTokenizer.from_pretrained(tiny_2b)
    prefix = template_ids(tokenizer, "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4)
                          + "<|vision_end|>" + QUESTION)
    start = len(prefix) + len(reason.suffix_ids)
    ids = torch.tensor([prefix + reason.suffix_ids + fed])
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_2b, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=ids, mm_token_type_ids=(ids == 151655).int(), output_attentions=True, **pixels)
    # queries: the decode steps (positions start .. end); keys: the reasoning tokens
    scores = torch.zeros(reasoning, dtype=torch.float64)
    received = sum(a[0, :, start:, start : start + reasoning].sum(dim=(0, 1)) for a in out.attentions)
    scores[: len(received)] = received.double()  # the last output token was never fed, so never attended
    ranked = sorted(range(reasoning), key=lambda i: (-scores[i].item(), i))
    kept, mass = [], 0.0
    for i in ranked:
        kept.append(i)
        mass += scores[i].item()
        if mass >= 0.8 * scores.sum().item():
            break
    assert transfer.kept_indices == sorted(kept)


def test_bad_requests_are_clear_and_leave_the_pair_usable(pair, image, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        (dict(image=str(tmp_path / "missing.png"), question=QUESTION), "missing.png"),
        (dict(image=str(broken), question=QUESTION), "broken.png.*could not be decoded"),
        (dict(image=image, question="   "), "the question is empty"),
        (dict(image=image, question=QUESTION, policy="fastest"), "policy 'fastest' is not one of"),
        (dict(image=image, question=QUESTION, keep="some"), "keep 'some' is not one of"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            pair.answer(**kwargs)
        assert pages_in_use(pair) == 0
    assert pair.answer(image, QUESTION, policy="small").answer is not None


def test_a_pair_with_different_tokenizers_is_refused(tiny_8b, tiny_2b, tmp_path):
    other = shutil.copytree(tiny_2b, tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]  # same tokens, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(spec))
    large = Engine.from_pretrained(tiny_8b, device="cpu", kv_cache_tokens=256)
    with pytest.raises(InputError, match="tokenizers differ.*'hello'|tokenizers differ.*'world'"):
        Tandem(large, Engine.from_pretrained(other, device="cpu", kv_cache_tokens=256))


def test_overlapped_verify_gives_the_sequential_result(engines, image):
    """verify's first two stages at once, each in its engine's loop, produce what they do one after the other."""
    sequential = Tandem(*engines, budget=BUDGET, overlap=False).answer(image, QUESTION, policy="verify", keep="attention")
    overlapped = Tandem(*engines, budget=BUDGET, overlap=True).answer(image, QUESTION, policy="verify", keep="attention")
    assert [s.output_ids for s in overlapped.stages] == [s.output_ids for s in sequential.stages]
    assert overlapped.stages[-1].kept_indices == sequential.stages[-1].kept_indices
    assert sum(e.pool.pages_in_use for e in engines) == 0


def test_one_engine_can_play_both_models(engines, image):
    """A pair of one engine (large is small): its verify stages share that engine's batch, overlapped or not."""
    one = Tandem(engines[0], engines[0], budget=BUDGET)
    overlapped = one.answer(image, QUESTION, policy="verify", keep="attention")
    one.overlap = False
    sequential = one.answer(image, QUESTION, policy="verify", keep="attention")
    assert [s.output_ids for s in overlapped.stages] == [s.output_ids for s in sequential.stages]
    assert engines[0].pool.pages_in_use == 0


def test_each_stage_streams_its_text_as_it_decodes(pair, image):
    """on_text receives every stage's text, piece by piece (verify's two first stages at once): joined per stage,
    the pieces are that stage's text, stop token excluded."""
    pieces = []
    result = pair.answer(image, QUESTION, policy="verify", on_text=lambda *piece: pieces.append(piece))
    streamed = {}
    for model, role, text in pieces:
        streamed[model, role] = streamed.get((model, role), "") + text
    assert sorted(streamed) == sorted((s.model, s.role) for s in result.stages)
    assert all(streamed[s.model, s.role] == s.text for s in result.stages)
    assert len(pieces) > len(result.stages)  # piece by piece, not a stage at a time
    with pytest.raises(InputError, match="on_text must be callable, got str"):
        pair.answer(image, QUESTION, on_text="print")
