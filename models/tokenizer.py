"""Qwen3-VL text side: tokenizer, chat template rendering, image-pad expansion and streaming detokenization."""

from __future__ import annotations

import functools
import json
import weakref
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, InputError

if TYPE_CHECKING:
    from .config import ModelConfig

# Qwen3-VL's special tokens and their ids; a tokenizer that disagrees belongs to another model.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
ROLES = ("system", "user", "assistant")
# Template variables transformers passes from tokenizer_config.json; some templates print e.g. {{ eos_token }}.
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A checkpoint's tokenizer.json (via the `tokenizers` library) plus its chat template."""

    def __init__(self, hf: _HFTokenizer, config: dict[str, Any], chat_template: str, template_source: Path) -> None:
        self._hf = hf
        self._template = _compile_template(chat_template, template_source)
        self._template_tokens = {key: _token_content(config.get(key)) for key in _TEMPLATE_TOKEN_KEYS}
        # Every id the tokenizer can produce is below this; the model's embedding table is padded beyond it (151936).
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.image_pad_id: int = SPECIAL_TOKENS["<|image_pad|>"]
        self.vision_start_id: int = SPECIAL_TOKENS["<|vision_start|>"]
        self.vision_end_id: int = SPECIAL_TOKENS["<|vision_end|>"]
        self.im_end_id: int = SPECIAL_TOKENS["<|im_end|>"]
        self.eos_ids: tuple[int, ...] = _eos_ids(hf, config)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> Tokenizer:
        folder = Path(checkpoint_dir)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{tokenizer_file}: missing; the checkpoint has no tokenizer")
        try:
            hf = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise CheckpointError(f"{tokenizer_file}: cannot be read as a tokenizer: {exc}") from exc
        _check_special_tokens(hf, tokenizer_file)
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        template, source = _find_chat_template(folder, config)
        return cls(hf, config, template, source)

    def check_model(self, config: "ModelConfig", checkpoint_dir: str | Path) -> None:
        """Refuse a tokenizer that does not belong to the model: ids the embedding has no row for, or image and
        vision ids other than the ones the model places images at. Cheap: run it before loading any weight."""
        folder = Path(checkpoint_dir)
        vocab = config.text.vocab_size
        if self.vocab_size > vocab:
            raise CheckpointError(
                f"{folder / 'tokenizer.json'} has {self.vocab_size} tokens (ids up to {self.vocab_size - 1}), but "
                f"{folder / 'config.json'} has text_config.vocab_size {vocab}: ids {vocab} and above have no "
                "embedding; the tokenizer belongs to another model")
        for name, model_id, tokenizer_id in (("image_token_id", config.image_token_id, self.image_pad_id),
                                             ("vision_start_token_id", config.vision_start_token_id, self.vision_start_id),
                                             ("vision_end_token_id", config.vision_end_token_id, self.vision_end_id)):
            if model_id != tokenizer_id:
                raise CheckpointError(
                    f"{folder / 'config.json'} has {name} {model_id}, but the tokenizer's id for that token is "
                    f"{tokenizer_id}: the model would never find the images in its prompts")

    @functools.cached_property
    def _vocab(self) -> MappingProxyType:
        return MappingProxyType(self._hf.get_vocab(with_added_tokens=True))  # 0.1 s to build: once

    def vocab(self) -> MappingProxyType:
        """Every token and its id, added tokens included (read-only)."""
        return self._vocab

    @functools.cached_property
    def _same(self) -> weakref.WeakSet:
        return weakref.WeakSet()  # tokenizers found to match this one (comparing vocabularies takes ~30 ms)

    def check_same(self, other: "Tokenizer", why: str) -> None:
        """Refuse a second model whose ids mean other tokens: ids that pass between models (`why`) need one
        tokenizer."""
        if self is other or other in self._same:
            return
        a, b = self.vocab(), other.vocab()
        if a == b:
            self._same.add(other)
            return
        token, token_id = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])[0]
        raise InputError(f"the two models' tokenizers differ (e.g. token {token!r} / id {token_id}; vocabularies of "
                         f"{len(a)} and {len(b)} tokens): {why}, which needs one tokenizer")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it are recognized, none are added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the checkpoint's chat template makes of `messages`, rendered as transformers does."""
        try:
            return self._template.render(
                messages=_plain(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_tokens,
            )
        except jinja2.TemplateError as exc:
            # Templates call raise_exception() on conversations they refuse, e.g. misordered roles.
            raise InputError(f"the chat template rejected the messages: {exc}") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: malformed JSON: {exc}") from exc


def _check_special_tokens(hf: _HFTokenizer, tokenizer_file: Path) -> None:
    for token, expected in SPECIAL_TOKENS.items():
        found = hf.token_to_id(token)
        if found is None:
            raise CheckpointError(
                f"{tokenizer_file}: special token {token} is missing; Qwen3-VL has it as id {expected}"
            )
        if found != expected:
            raise CheckpointError(
                f"{tokenizer_file}: special token {token} has id {found}; Qwen3-VL expects {expected}"
            )


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a token either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(hf: _HFTokenizer, config: dict[str, Any]) -> tuple[int, ...]:
    # Chat turns end with <|im_end|>; <|endoftext|> ends raw text. A differing configured eos token stops too.
    ids = [SPECIAL_TOKENS["<|im_end|>"], SPECIAL_TOKENS["<|endoftext|>"]]
    configured = _token_content(config.get("eos_token"))
    configured_id = hf.token_to_id(configured) if configured else None
    if configured_id is not None and configured_id not in ids:
        ids.append(configured_id)
    return tuple(ids)


def _find_chat_template(folder: Path, config: dict[str, Any]) -> tuple[str, Path]:
    """The chat template with transformers' processor precedence: .jinja, then chat_template.json, then the config."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        template = _read_json(json_file)
        template = template.get("chat_template") if isinstance(template, dict) else None
        if not isinstance(template, str):
            raise CheckpointError(f"{json_file}: has no string \"chat_template\" entry")
        return template, json_file
    config_file = folder / "tokenizer_config.json"
    template = config.get("chat_template")
    if isinstance(template, list):
        # Older configs hold named templates; "default" is the one used for plain chat.
        named = (t for t in template if isinstance(t, dict) and t.get("name") == "default")
        template = next((t.get("template") for t in named), None)
    if isinstance(template, str):
        return template, config_file
    raise CheckpointError(
        f"{folder}: no chat template: neither chat_template.jinja, chat_template.json nor a \"chat_template\" "
        f"entry in {config_file.name}"
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile_template(template: str, source: Path) -> jinja2.Template:
    # The environment transformers builds in chat_template_utils, so real templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"{source}: chat template does not compile: {exc}") from exc


def _plain(value: Any) -> Any:
    """A copy of the messages made only of JSON types, as transformers gives templates.

    Images (PIL objects, arrays) become inert "<TypeName>" placeholders: templates only test whether an image key
    is present, and the sandbox should never see objects with methods of their own.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _is_image_part(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part


def extract_images(messages: list[dict]) -> list:
    """The image sources of the messages, in the order their <|image_pad|> tokens appear in the prompt."""
    images = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            images.extend(part.get("image") for part in content if _is_image_part(part))
    return images


def validate_messages(messages: Any) -> None:
    """Raise InputError, naming the message and part, unless `messages` is a chat this runtime can serve."""
    if not isinstance(messages, list):
        raise InputError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InputError("messages is empty")
    for index, message in enumerate(messages):
        _validate_message(index, message)


def _validate_message(index: int, message: Any) -> None:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise InputError(f"{where}: must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role is None:
        raise InputError(f"{where}: missing \"role\"")
    if role not in ROLES:
        raise InputError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if role == "system" and index != 0:
        raise InputError(f"{where}: a system message must be the first message")
    if "content" not in message:
        raise InputError(f"{where}: missing \"content\"")
    content = message["content"]
    if isinstance(content, str):
        nonempty = content != ""
    elif isinstance(content, list):
        # Validate every part before judging emptiness, so a bad part is reported even after a good one.
        contributes = [_validate_part(f"{where} part {i}", part) for i, part in enumerate(content)]
        nonempty = any(contributes)
    else:
        raise InputError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    if not nonempty:
        # An empty turn is almost always a client bug, and gives the model nothing to answer.
        raise InputError(f"{where}: content is empty (no text and no image)")


def _validate_part(where: str, part: Any) -> bool:
    """Check one content part; True when it contributes something (an image or nonempty text)."""
    if not isinstance(part, dict):
        raise InputError(f"{where}: must be a dict, got {type(part).__name__}")
    if _is_image_part(part):
        if part.get("image") is None:
            raise InputError(f"{where}: image part without an \"image\" (a file path, data: URL, bytes, PIL image, "
                             "numpy array or torch tensor)")
        return True
    kind = part.get("type")
    if kind is None:
        raise InputError(f"{where}: part without \"type\"")
    if kind != "text":
        raise InputError(f"{where}: unsupported part type {kind!r}; expected \"text\" or \"image\"")
    if not isinstance(part.get("text"), str):
        raise InputError(f"{where}: text part needs a string \"text\"")
    return part["text"] != ""


def expand_image_pads(ids: list[int], tokens_per_image: list[int], image_pad_id: int) -> list[int]:
    """Give image i exactly tokens_per_image[i] pad ids; each maximal run of pads is one image, in order."""
    runs = _pad_runs(ids, image_pad_id)
    if len(runs) != len(tokens_per_image):
        raise InputError(f"the prompt has {len(runs)} image placeholders but {len(tokens_per_image)} images")
    out: list[int] = []
    previous_end = 0
    for image, ((start, end), count) in enumerate(zip(runs, tokens_per_image)):
        if count < 1:
            raise InputError(f"image {image}: needs at least 1 token, got {count}")
        length = end - start
        if length not in (1, count):
            raise InputError(
                f"image {image}: placeholder run of {length} <|image_pad|> tokens, expected 1 or {count}"
            )
        out += ids[previous_end:start]
        out += [image_pad_id] * count
        previous_end = end
    out += ids[previous_end:]
    return out


def _pad_runs(ids: list[int], pad_id: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, token in enumerate(ids):
        if token != pad_id:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def build_prompt_ids(tokenizer: Tokenizer, messages: list[dict], tokens_per_image: list[int]) -> list[int]:
    """Prompt ids for a chat, with each image's placeholder expanded to its token count."""
    validate_messages(messages)
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
    return expand_image_pads(ids, tokens_per_image, tokenizer.image_pad_id)


class IncrementalDetokenizer:
    """Turns generated ids into text piece by piece, with vLLM's prefix/read offset window.

    The window holds the ids from `prefix` (context already emitted) on; text is emitted only once it is
    longer than the context's and does not end in U+FFFD (half a UTF-8 character). Emitted ids then become
    the new context, so each step decodes a few ids, not the whole output.
    """

    # Prompt ids kept as context: tokenizers whose decoding depends on the previous token (leading spaces) need some.
    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._window = list(prompt_ids or [])[-self._PROMPT_CONTEXT:]
        self._read = len(self._window)  # window[:_read] is context whose text was emitted (or is the prompt's)

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is incomplete or for a special token."""
        self._window.append(token_id)
        prefix, text = self._texts()
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        return self._advance(prefix, text)

    def flush(self) -> str:
        """At the end of a stream, whatever is held back (incomplete bytes decode to U+FFFD, as decode() does)."""
        prefix, text = self._texts()
        return self._advance(prefix, text) if len(text) > len(prefix) else ""

    def _texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        return decode(self._window[: self._read]), decode(self._window)

    def _advance(self, prefix: str, text: str) -> str:
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(prefix) :]
