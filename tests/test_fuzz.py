"""Bad input and misuse, tried as a careful user would, against Engine and Tandem.

Every case must raise the named TandemError subclass with a message that names what is wrong (the field, message
and part index, image index and file, tensor or value), and leave the runtime as it was: afterwards no KV page is
in use and an ordinary request still gets its ordinary answer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tandem.models.errors import CheckpointError, InputError, TandemError
from tandem.runtime import Budget, Engine, Prompts, SamplingParams, Tandem
from tandem.runtime.pipeline import _Request

from conftest import random_image
from image_files import blank_png

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
IMAGE = random_image(64, 80, seed=3)


def user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(x) -> dict:
    return {"type": "image", "image": x}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Image files every case may point at."""
    folder = tmp_path_factory.mktemp("fuzz-files")
    Image.fromarray(IMAGE).save(folder / "ok.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "ok.png").read_bytes()[:60])
    frames = [Image.fromarray(random_image(32, 32, seed=i)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    (folder / "huge.png").write_bytes(blank_png(10000, 10000))
    (folder / "a-folder").mkdir()
    return folder


@pytest.fixture(scope="module")
def engine(tiny_2b) -> Engine:
    # 4096 tokens of KV cache: a 10000x10000 image (16384 tokens) cannot fit.
    return Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def ordinary(engine) -> list[int]:
    return engine.generate(user(image(IMAGE), text("What is it?")), GREEDY).token_ids


@pytest.fixture(scope="module")
def pair(tiny_2b, tiny_8b) -> Tandem:
    engines = [Engine.from_pretrained(p, device="cpu", dtype="float32", kv_cache_tokens=4096) for p in (tiny_8b, tiny_2b)]
    return Tandem(*engines, budget=Budget(short_tokens=2, reason_tokens=4))


@pytest.fixture(scope="module")
def ordinary_answer(pair) -> list:
    return [s.output_ids for s in pair.answer(IMAGE, "What is it?", policy="verify").stages]


def _refused(call, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern) as caught:
        call()
    assert isinstance(caught.value, TandemError)


# ---- Engine.generate and friends --------------------------------------------------------------------------------
# (case id, a function of (engine, files) that makes the bad call, error type, pattern its message must match)
ENGINE_CASES = [
    # messages of the wrong shape
    ("messages-dict", lambda e, f: e.generate({"role": "user", "content": "hi"}, GREEDY), InputError,
     r"messages must be a list of dicts, got dict"),
    ("messages-int", lambda e, f: e.generate(42, GREEDY), InputError, r"messages must be a list of dicts, got int"),
    ("messages-empty", lambda e, f: e.generate([], GREEDY), InputError, r"messages is empty"),
    ("message-str", lambda e, f: e.generate(["hello"], GREEDY), InputError, r"message 0: must be a dict, got str"),
    ("message-no-role", lambda e, f: e.generate([{"content": "hi"}], GREEDY), InputError, r"message 0: missing \"role\""),
    ("message-bad-role", lambda e, f: e.generate([{"role": "robot", "content": "hi"}], GREEDY), InputError,
     r"message 0: unknown role 'robot'"),
    ("message-no-content", lambda e, f: e.generate([{"role": "user"}], GREEDY), InputError,
     r"message 0: missing \"content\""),
    ("content-int", lambda e, f: e.generate([{"role": "user", "content": 5}], GREEDY), InputError,
     r"message 0: content must be a string or a list of parts, got int"),
    ("content-empty", lambda e, f: e.generate([{"role": "user", "content": ""}], GREEDY), InputError,
     r"message 0: content is empty"),
    ("part-bare-str", lambda e, f: e.generate(user("What is this?"), GREEDY), InputError,
     r"message 0 part 0: must be a dict, got str"),
    ("part-no-type", lambda e, f: e.generate(user({"text": "hi"}), GREEDY), InputError,
     r"message 0 part 0: part without \"type\""),
    ("part-audio", lambda e, f: e.generate(user({"type": "audio", "audio": "a.wav"}), GREEDY), InputError,
     r"message 0 part 0: unsupported part type 'audio'"),
    ("part-text-not-str", lambda e, f: e.generate(user({"type": "text", "text": 3}), GREEDY), InputError,
     r"message 0 part 0: text part needs a string"),
    ("part-image-missing", lambda e, f: e.generate(user(text("a"), {"type": "image"}), GREEDY), InputError,
     r"message 0 part 1: image part without an \"image\""),
    ("second-message-bad", lambda e, f: e.generate([{"role": "user", "content": "a"}, {"role": "assistant"}], GREEDY),
     InputError, r"message 1: missing \"content\""),
    ("system-not-first", lambda e, f: e.generate([{"role": "user", "content": "a"},
                                                 {"role": "system", "content": "b"}], GREEDY),
     InputError, r"message 1: a system message must be the first message"),
    ("messages-and-ids", lambda e, f: e.generate("hi", GREEDY, prompt_token_ids=[1, 2]), InputError,
     r"either messages or prompt_token_ids"),
    ("neither", lambda e, f: e.generate(None, GREEDY), InputError, r"either messages or prompt_token_ids"),
    ("images-with-messages", lambda e, f: e.generate("hi", GREEDY, images=[IMAGE]), InputError,
     r"images go inside messages"),
    # sampling params: every field, types too, refused before any work
    ("sampling-dict", lambda e, f: e.generate("hi", {"max_tokens": 5}), InputError,
     r"sampling must be a SamplingParams, got dict"),
    ("max-tokens-0", lambda e, f: e.generate("hi", SamplingParams(max_tokens=0)), InputError, r"SamplingParams\.max_tokens"),
    ("max-tokens-str", lambda e, f: e.generate("hi", SamplingParams(max_tokens="5")), InputError,
     r"SamplingParams\.max_tokens .*'5'"),
    ("max-tokens-float", lambda e, f: e.generate("hi", SamplingParams(max_tokens=5.0)), InputError,
     r"SamplingParams\.max_tokens .*5\.0"),
    ("max-tokens-bool", lambda e, f: e.generate("hi", SamplingParams(max_tokens=True)), InputError,
     r"SamplingParams\.max_tokens .*True"),
    ("temperature-str", lambda e, f: e.generate("hi", SamplingParams(temperature="0.7")), InputError,
     r"SamplingParams\.temperature .*'0\.7'"),
    ("temperature-neg", lambda e, f: e.generate("hi", SamplingParams(temperature=-0.1)), InputError,
     r"SamplingParams\.temperature .*-0\.1"),
    ("temperature-nan", lambda e, f: e.generate("hi", SamplingParams(temperature=float("nan"))), InputError,
     r"SamplingParams\.temperature .*nan"),
    ("top-p-0", lambda e, f: e.generate("hi", SamplingParams(top_p=0)), InputError, r"SamplingParams\.top_p .*0"),
    ("top-p-str", lambda e, f: e.generate("hi", SamplingParams(top_p="high")), InputError,
     r"SamplingParams\.top_p .*'high'"),
    ("top-k-neg", lambda e, f: e.generate("hi", SamplingParams(top_k=-1)), InputError, r"SamplingParams\.top_k .*-1"),
    ("top-k-float", lambda e, f: e.generate("hi", SamplingParams(top_k=2.5)), InputError, r"SamplingParams\.top_k .*2\.5"),
    ("seed-str", lambda e, f: e.generate("hi", SamplingParams(seed="7")), InputError, r"SamplingParams\.seed .*'7'"),
    ("seed-neg", lambda e, f: e.generate("hi", SamplingParams(seed=-3)), InputError, r"SamplingParams\.seed .*-3"),
    ("seed-float", lambda e, f: e.generate("hi", SamplingParams(seed=1.5)), InputError, r"SamplingParams\.seed .*1\.5"),
    ("ignore-eos-str", lambda e, f: e.generate("hi", SamplingParams(ignore_eos="yes")), InputError,
     r"SamplingParams\.ignore_eos .*'yes'"),
    ("stop-ids-int", lambda e, f: e.generate("hi", SamplingParams(stop_token_ids=151645)), InputError,
     r"SamplingParams\.stop_token_ids must be a list"),
    ("stop-ids-str", lambda e, f: e.generate("hi", SamplingParams(stop_token_ids="<|im_end|>")), InputError,
     r"SamplingParams\.stop_token_ids must be a list"),
    ("stop-id-str", lambda e, f: e.generate("hi", SamplingParams(stop_token_ids=["x"])), InputError,
     r"SamplingParams\.stop_token_ids\[0\] = 'x'"),
    ("stop-id-neg", lambda e, f: e.generate("hi", SamplingParams(stop_token_ids=[5, -1])), InputError,
     r"SamplingParams\.stop_token_ids\[1\] = -1"),
    ("stop-id-beyond-vocab", lambda e, f: e.generate("hi", SamplingParams(stop_token_ids=[10**6])), InputError,
     r"SamplingParams\.stop_token_ids\[0\] = 1000000 is not a token id in \[0, 151936\)"),
    ("stop-id-float", lambda e, f: e.generate("hi", SamplingParams(stop_token_ids=[2.0])), InputError,
     r"SamplingParams\.stop_token_ids\[0\] = 2\.0"),
    # prompt_token_ids
    ("ids-empty", lambda e, f: e.generate(prompt_token_ids=[], sampling=GREEDY), InputError, r"prompt_token_ids is empty"),
    ("ids-str", lambda e, f: e.generate(prompt_token_ids="hello", sampling=GREEDY), InputError,
     r"prompt_token_ids must be a list of token ids, got str"),
    ("ids-negative", lambda e, f: e.generate(prompt_token_ids=[1, -2], sampling=GREEDY), InputError,
     r"prompt_token_ids\[1\] = -2 is not a token id"),
    ("ids-beyond-vocab", lambda e, f: e.generate(prompt_token_ids=[151936], sampling=GREEDY), InputError,
     r"prompt_token_ids\[0\] = 151936 is not a token id in \[0, 151936\)"),
    ("ids-float", lambda e, f: e.generate(prompt_token_ids=[1.0], sampling=GREEDY), InputError,
     r"prompt_token_ids\[0\] = 1\.0"),
    ("ids-bool", lambda e, f: e.generate(prompt_token_ids=[True], sampling=GREEDY), InputError,
     r"prompt_token_ids\[0\] = True"),
    ("ids-float-tensor", lambda e, f: e.generate(prompt_token_ids=torch.tensor([1.0, 2.0]), sampling=GREEDY),
     InputError, r"prompt_token_ids is a Tensor of float32: token ids are integers"),
    ("ids-2d-tensor", lambda e, f: e.generate(prompt_token_ids=torch.tensor([[1, 2]]), sampling=GREEDY), InputError,
     r"prompt_token_ids has shape \[1, 2\]: pass one sequence"),
    ("ids-float-numpy", lambda e, f: e.generate(prompt_token_ids=np.array([1.5]), sampling=GREEDY), InputError,
     r"prompt_token_ids is a ndarray of float64"),
    ("ids-bool-numpy", lambda e, f: e.generate(prompt_token_ids=np.array([True]), sampling=GREEDY), InputError,
     r"prompt_token_ids is a ndarray of bool"),
    ("ids-images-not-list", lambda e, f: e.generate(prompt_token_ids=[1, 151655], images=IMAGE, sampling=GREEDY),
     InputError, r"images must be a list, got ndarray"),
    ("ids-pads-without-images", lambda e, f: e.generate(prompt_token_ids=[1, 151655], sampling=GREEDY), InputError,
     r"1 image placeholders but 0 images"),
    ("ids-images-without-pads", lambda e, f: e.generate(prompt_token_ids=[1, 2], images=[IMAGE], sampling=GREEDY),
     InputError, r"0 image placeholders but 1 images"),
    # lengths and the cache
    ("max-tokens-beyond-cache", lambda e, f: e.generate("hi", SamplingParams(max_tokens=5000)), InputError,
     r"needs 50\d\d tokens of KV cache .*the cache holds \(capacity 4096 tokens"),
    ("max-tokens-beyond-context", lambda e, f: e.generate("hi", SamplingParams(max_tokens=10**7)), InputError,
     r"prompt \+ max_tokens = 100000\d\d tokens exceeds the model's context"),
    ("huge-image-file", lambda e, f: e.generate(user(image(f / "huge.png"), text("hi")), GREEDY), InputError,
     r"needs 16\d\d\d tokens of KV cache"),
    ("huge-image-array", lambda e, f: e.generate(user(image(np.zeros((6000, 6000), np.uint8)), text("hi")), GREEDY),
     InputError, r"tokens of KV cache"),
    # images, through the messages
    ("image-none", lambda e, f: e.generate(user(image(None), text("hi")), GREEDY), InputError,
     r"message 0 part 0: image part without an \"image\""),
    ("image-int", lambda e, f: e.generate(user(image(42), text("hi")), GREEDY), InputError,
     r"image 0: unsupported image type int"),
    ("image-dict", lambda e, f: e.generate(user(image({"url": "x"}), text("hi")), GREEDY), InputError,
     r"image 0: unsupported image type dict"),
    ("image-list", lambda e, f: e.generate(user(image([[0, 0, 0]]), text("hi")), GREEDY), InputError,
     r"image 0: unsupported image type list"),
    ("image-http", lambda e, f: e.generate(user(image("http://example.com/cat.jpg"), text("hi")), GREEDY), InputError,
     r"image 0 \(http://example.com/cat.jpg\): http URLs are not fetched"),
    ("image-https", lambda e, f: e.generate(user(image("https://example.com/cat.jpg"), text("hi")), GREEDY), InputError,
     r"image 0 .*https URLs are not fetched"),
    ("image-empty-path", lambda e, f: e.generate(user(image(""), text("hi")), GREEDY), InputError,
     r"image 0: empty path"),
    ("image-missing-file", lambda e, f: e.generate(user(image(str(f / "nope.jpg")), text("hi")), GREEDY), InputError,
     r"image 0 \(.*nope\.jpg\): file not found"),
    ("image-second-missing", lambda e, f: e.generate(user(image(IMAGE), image(f / "nope.jpg"), text("hi")), GREEDY),
     InputError, r"image 1 \(.*nope\.jpg\): file not found"),
    ("image-directory", lambda e, f: e.generate(user(image(f / "a-folder"), text("hi")), GREEDY), InputError,
     r"image 0 \(.*a-folder\): is a directory"),
    ("image-empty-file", lambda e, f: e.generate(user(image(f / "empty.png"), text("hi")), GREEDY), InputError,
     r"image 0 \(.*empty\.png\): empty file"),
    ("image-text-file", lambda e, f: e.generate(user(image(f / "notes.txt"), text("hi")), GREEDY), InputError,
     r"image 0 \(.*notes\.txt\): could not be decoded"),
    ("image-truncated", lambda e, f: e.generate(user(image(f / "truncated.png"), text("hi")), GREEDY), InputError,
     r"image 0 \(.*truncated\.png\): could not be decoded"),
    ("image-animated-gif", lambda e, f: e.generate(user(image(f / "anim.gif"), text("hi")), GREEDY), InputError,
     r"image 0 \(.*anim\.gif\): GIF image has 3 frames"),
    ("image-bad-base64", lambda e, f: e.generate(user(image("data:image/png;base64,@@"), text("hi")), GREEDY),
     InputError, r"image 0 .*invalid base64"),
    ("image-text-data-url", lambda e, f: e.generate(user(image("data:text/plain;base64,aGk="), text("hi")), GREEDY),
     InputError, r"image 0 .*data URL of type 'text/plain', not an image"),
    ("image-empty-bytes", lambda e, f: e.generate(user(image(b""), text("hi")), GREEDY), InputError,
     r"image 0 \(0 bytes\): empty image data"),
    ("image-junk-bytes", lambda e, f: e.generate(user(image(b"junk"), text("hi")), GREEDY), InputError,
     r"image 0 \(4 bytes\): could not be decoded"),
    ("image-zero-size", lambda e, f: e.generate(user(image(np.zeros((0, 5, 3), np.uint8)), text("hi")), GREEDY),
     InputError, r"image 0: zero size: 0x5"),
    ("image-1d", lambda e, f: e.generate(user(image(np.zeros(5, np.uint8)), text("hi")), GREEDY), InputError,
     r"image 0: numpy uint8 array of shape \(5,\): expected \(H, W\)"),
    ("image-batch", lambda e, f: e.generate(user(image(np.zeros((1, 4, 4, 3), np.uint8)), text("hi")), GREEDY),
     InputError, r"image 0: .*a batch\?"),
    ("image-channels-first-numpy", lambda e, f: e.generate(user(image(np.zeros((3, 32, 32), np.uint8)), text("hi")),
                                                           GREEDY), InputError, r"image 0: .*C = 32 \(channels first\?"),
    ("image-channels-last-tensor", lambda e, f: e.generate(user(image(torch.zeros(32, 32, 3, dtype=torch.uint8)),
                                                                text("hi")), GREEDY),
     InputError, r"image 0: .*C = 32 \(channels last\?"),
    ("image-int64", lambda e, f: e.generate(user(image(np.zeros((4, 4, 3), np.int64)), text("hi")), GREEDY),
     InputError, r"image 0: numpy int64 array .*pixel type not supported"),
    ("image-float-255", lambda e, f: e.generate(user(image(np.full((4, 4, 3), 255.0)), text("hi")), GREEDY),
     InputError, r"image 0: .*has values in \[255, 255\]"),
    ("image-float-nan", lambda e, f: e.generate(user(image(np.full((4, 4, 3), np.nan)), text("hi")), GREEDY),
     InputError, r"image 0: .*48 NaN or infinite values"),
    ("image-tensor-negative", lambda e, f: e.generate(user(image(-torch.ones(3, 4, 4)), text("hi")), GREEDY),
     InputError, r"image 0: .*has values in \[-1, -1\]"),
    ("image-pil-mode-i-big", lambda e, f: e.generate(
        user(image(Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I")), text("hi")), GREEDY),
     InputError, r"image 0: .*mode I has values in \[70000, 70000\]"),
    ("image-pil-mode-f-big", lambda e, f: e.generate(
        user(image(Image.fromarray(np.full((4, 4), 2.5, np.float32), mode="F")), text("hi")), GREEDY),
     InputError, r"image 0: .*mode F has values in \[2\.5"),
    ("image-aspect", lambda e, f: e.generate(user(image(np.zeros((300, 1, 3), np.uint8)), text("hi")), GREEDY),
     InputError, r"image 0: aspect ratio 300\.00 exceeds 200"),
    # batches: one bad request refuses the whole batch, naming it
    ("batch-not-list", lambda e, f: e.generate_batch("hi", GREEDY), InputError,
     r"generate_batch takes a list of requests, got str"),
    ("batch-bad-member", lambda e, f: e.generate_batch(["hi", user(image(f / "nope.jpg"))], GREEDY), InputError,
     r"image 0 \(.*nope\.jpg\): file not found"),
    ("batch-bad-sampling", lambda e, f: e.generate_batch(["hi"], SamplingParams(top_p=2)), InputError,
     r"SamplingParams\.top_p"),
    ("stream-bad-sampling", lambda e, f: e.stream("hi", SamplingParams(top_k="3")), InputError,
     r"SamplingParams\.top_k .*'3'"),
    ("stream-bad-messages", lambda e, f: e.stream([{"role": "user"}], GREEDY), InputError,
     r"message 0: missing \"content\""),
]


@pytest.mark.parametrize("make,error,pattern", [c[1:] for c in ENGINE_CASES], ids=[c[0] for c in ENGINE_CASES])
def test_engine_refuses_bad_input_and_stays_usable(engine, ordinary, files, make, error, pattern):
    work = (engine.stats.prefill_tokens, engine.stats.decode_steps)
    _refused(lambda: make(engine, files), error, pattern)
    assert (engine.stats.prefill_tokens, engine.stats.decode_steps) == work  # refused before any model work
    assert engine.pool.pages_in_use == 0
    assert engine.generate(user(image(IMAGE), text("What is it?")), GREEDY).token_ids == ordinary
    assert engine.pool.pages_in_use == 0


# ---- inputs that are accepted: what users hold ---------------------------------------------------------------------
def test_what_users_hold_is_accepted_and_means_the_same(engine):
    ids = engine.prepare("Hello there").token_ids
    by_list = engine.generate(prompt_token_ids=ids, sampling=GREEDY).token_ids
    assert engine.generate("Hello there", GREEDY).token_ids == by_list  # a string is one user message
    assert engine.generate([{"role": "user", "content": "Hello there"}], GREEDY).token_ids == by_list
    for held in (torch.tensor(ids), np.array(ids), np.array(ids, dtype=np.int32), tuple(ids)):
        assert engine.generate(prompt_token_ids=held, sampling=GREEDY).token_ids == by_list
    stops = SamplingParams(max_tokens=3, temperature=0.0, stop_token_ids=[np.int64(by_list[1])])
    assert engine.generate("Hello there", stops).token_ids == by_list[:2]
    bgr = np.ascontiguousarray(IMAGE[..., ::-1])
    reference = engine.generate(user(image(IMAGE), text("What?")), GREEDY).token_ids
    assert engine.generate(user(image(bgr[..., ::-1]), text("What?")), GREEDY).token_ids == reference
    chw = torch.from_numpy(IMAGE).permute(2, 0, 1)
    assert engine.generate(user(image(chw), text("What?")), GREEDY).token_ids == reference
    assert engine.generate(user(image(IMAGE / 255.0), text("What?")), GREEDY).token_ids == reference


# ---- Tandem.answer -----------------------------------------------------------------------------------------------
PAIR_CASES = [
    ("policy-unknown", dict(policy="fast"), InputError, r"policy 'fast' is not one of"),
    ("policy-none", dict(policy=None), InputError, r"policy None is not one of"),
    ("keep-unknown", dict(keep="some"), InputError, r"keep 'some' is not one of"),
    ("delta-str", dict(delta="0.8"), InputError, r"delta must be a number in \(0, 1\], got '0\.8'"),
    ("delta-zero", dict(delta=0), InputError, r"delta must be a number in \(0, 1\], got 0"),
    ("delta-big", dict(delta=1.5), InputError, r"delta must be a number in \(0, 1\], got 1\.5"),
    ("delta-nan", dict(delta=float("nan")), InputError, r"delta must be a number in \(0, 1\], got nan"),
    ("delta-bool", dict(delta=True), InputError, r"delta must be a number in \(0, 1\], got True"),
    ("question-empty", dict(question="  "), InputError, r"the question is empty"),
    ("question-none", dict(question=None), InputError, r"the question must be a string, got NoneType"),
    ("question-list", dict(question=["what?"]), InputError, r"the question must be a string, got list"),
    ("image-missing", dict(image="nope.png"), InputError, r"image 0 \(nope\.png\): file not found"),
    ("image-url", dict(image="https://example.com/a.png"), InputError, r"image 0 .*https URLs are not fetched"),
    ("image-none", dict(image=None), InputError, r"image 0: unsupported image type NoneType"),
    ("image-batch-tensor", dict(image=torch.zeros(1, 3, 8, 8)), InputError, r"image 0: .*a batch\?"),
    ("image-float-range", dict(image=np.full((8, 8, 3), 3.0)), InputError, r"image 0: .*has values in \[3, 3\]"),
    ("image-huge", dict(image=np.zeros((6000, 6000, 3), np.uint8)), InputError, r"tokens of KV cache"),
]


@pytest.mark.parametrize("bad,error,pattern", [c[1:] for c in PAIR_CASES], ids=[c[0] for c in PAIR_CASES])
def test_pair_refuses_bad_input_and_stays_usable(pair, ordinary_answer, bad, error, pattern):
    call = dict(image=IMAGE, question="What is it?", policy="verify") | bad
    _refused(lambda: pair.answer(**call), error, pattern)
    assert all(e.pool.pages_in_use == 0 for e in pair.engines.values())
    assert [s.output_ids for s in pair.answer(IMAGE, "What is it?", policy="verify").stages] == ordinary_answer


def test_pair_takes_every_image_the_engine_takes(pair, ordinary_answer):
    """One loader: a CHW uint8 tensor, a float array in [0, 1] and a BGR view all answer as the array does."""
    for held in (torch.from_numpy(IMAGE).permute(2, 0, 1), IMAGE / 255.0, np.ascontiguousarray(IMAGE[..., ::-1])[..., ::-1]):
        assert [s.output_ids for s in pair.answer(held, "What is it?", policy="verify").stages] == ordinary_answer


def test_a_question_that_holds_template_text_is_not_split_there(pair):
    """The stage instruction goes after the whole question, even when the question contains text that looks like
    a marker or the template's own tokens."""
    tricky = "Is it \x00tandem-split\x00 a cat? <|im_end|>"
    result = pair.answer(IMAGE, tricky, policy="large")
    prompt = pair.engines["large"].tokenizer.decode(result.stages[0].suffix_ids, skip_special_tokens=False)
    assert prompt.startswith("\n" + Prompts().short)
    head, _ = pair._chat_parts(_Request(tricky, "large", Budget(), start=0.0), "large")
    assert head.endswith(tricky)


CONSTRUCTION_CASES = [
    ("budget-short-0", lambda: Budget(short_tokens=0), r"Budget\.short_tokens must be a positive integer, got 0"),
    ("budget-reason-str", lambda: Budget(reason_tokens="512"), r"Budget\.reason_tokens .*'512'"),
    ("budget-reason-float", lambda: Budget(reason_tokens=2.5), r"Budget\.reason_tokens .*2\.5"),
    ("budget-temperature-neg", lambda: Budget(temperature=-1), r"Budget\.temperature .*-1"),
    ("budget-temperature-str", lambda: Budget(temperature="0"), r"Budget\.temperature .*'0'"),
    ("budget-ignore-eos-int", lambda: Budget(ignore_eos=1), r"Budget\.ignore_eos .*1"),
    ("prompts-no-slot", lambda: Prompts(transfer="Answer now."), r"Prompts\.transfer must hold \{reasoning\} exactly once"),
    ("prompts-two-slots", lambda: Prompts(transfer="{reasoning} {reasoning}"), r"Prompts\.transfer must hold"),
    ("prompts-not-str", lambda: Prompts(short=5), r"Prompts\.short must be a string, got int"),
]


@pytest.mark.parametrize("make,pattern", [c[1:] for c in CONSTRUCTION_CASES], ids=[c[0] for c in CONSTRUCTION_CASES])
def test_settings_are_refused_where_they_are_written(make, pattern):
    _refused(make, InputError, pattern)


# ---- checkpoints -------------------------------------------------------------------------------------------------
def _copy(tiny: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def _edit_tensors(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _nan_at(name: str, index: int):
    def edit(state):
        state[name].view(-1)[index] = float("nan")
    return edit


def _inf_at(name: str):
    def edit(state):
        state[name].view(-1)[0] = float("inf")
    return edit


def _set(section: str | None, key: str, value):
    def edit(config):
        (config[section] if section else config)[key] = value
    return edit


CHECKPOINT_CASES = [
    ("nan-weight", lambda f: _edit_tensors(f, _nan_at("model.language_model.layers.1.mlp.down_proj.weight", 7)),
     r"model\.safetensors: tensor model\.language_model\.layers\.1\.mlp\.down_proj\.weight holds 1 non-finite"),
    ("inf-norm", lambda f: _edit_tensors(f, _inf_at("model.language_model.norm.weight")),
     r"tensor model\.language_model\.norm\.weight holds 1 non-finite value"),
    ("nan-vision", lambda f: _edit_tensors(f, _nan_at("model.visual.patch_embed.proj.weight", 3)),
     r"tensor model\.visual\.patch_embed\.proj\.weight holds 1 non-finite"),
    ("hidden-negative", lambda f: _edit_config(f, _set("text_config", "hidden_size", -64)),
     r"config\.json: .*text_config\.hidden_size must be an integer >= 1, got -64"),
    ("layers-zero", lambda f: _edit_config(f, _set("text_config", "num_hidden_layers", 0)),
     r"text_config\.num_hidden_layers must be an integer >= 1, got 0"),
    ("heads-str", lambda f: _edit_config(f, _set("text_config", "num_attention_heads", "4")),
     r"text_config\.num_attention_heads must be an integer >= 1, got '4'"),
    ("vision-depth-neg", lambda f: _edit_config(f, _set("vision_config", "depth", -1)),
     r"vision_config\.depth must be an integer >= 1, got -1"),
    ("eps-zero", lambda f: _edit_config(f, _set("text_config", "rms_norm_eps", 0)),
     r"text_config\.rms_norm_eps must be a finite number > 0, got 0"),
    ("kv-heads-not-dividing", lambda f: _edit_config(f, _set("text_config", "num_key_value_heads", 3)),
     r"num_attention_heads \(\d+\) must be a multiple of num_key_value_heads \(3\)"),
    ("text-config-missing", lambda f: _edit_config(f, lambda c: c.pop("text_config")), r"text_config is missing"),
    ("vocab-smaller-than-tokenizer", lambda f: _edit_config(f, _set("text_config", "vocab_size", 1000)),
     r"tokenizer\.json has 1516\d\d tokens .*config\.json has text_config\.vocab_size 1000"),
    ("image-token-id-differs", lambda f: _edit_config(f, _set(None, "image_token_id", 151654)),
     r"config\.json has image_token_id 151654, but the tokenizer's id for that token is 151655"),
    ("vision-start-differs", lambda f: _edit_config(f, _set(None, "vision_start_token_id", 7)),
     r"config\.json has vision_start_token_id 7"),
    ("generation-config-temperature", lambda f: (f / "generation_config.json").write_text(
        json.dumps({"temperature": -2, "eos_token_id": 151645})),
     r"generation_config\.json: malformed generation config .*temperature"),
]


@pytest.mark.parametrize("breaks,pattern", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_broken_checkpoint_is_refused_naming_file_and_field(tiny_2b, tmp_path, engine, ordinary, breaks, pattern):
    folder = _copy(tiny_2b, tmp_path)
    breaks(folder)
    _refused(lambda: Engine.from_pretrained(folder, device="cpu", dtype="float32", kv_cache_tokens=256),
             CheckpointError, pattern)
    assert engine.generate(user(image(IMAGE), text("What is it?")), GREEDY).token_ids == ordinary


def test_the_suite_is_as_large_as_promised():
    assert len(ENGINE_CASES) + len(PAIR_CASES) + len(CONSTRUCTION_CASES) + len(CHECKPOINT_CASES) >= 100
