"""The OpenAI chat-completions protocol: a request body checked and turned into what an engine or the pair takes,
and the bodies of responses, stream chunks and errors, as the `openai` client reads them.

Checked strictly, so that nothing a client asks for is silently dropped: an unknown field is a 400 naming it, and
the OpenAI fields Tandem does not implement (penalties, logprobs, tools, ...) are accepted only at values that
ask for nothing. Beyond OpenAI's schema, as vLLM takes them: `top_k`, `stop_token_ids`, `ignore_eos`; and for the
pair, `keep` and `delta`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tandem.models.errors import InputError
from tandem.runtime.media import MediaLimits, image_bytes
from tandem.runtime.request import Timings
from tandem.runtime.sampling import SamplingParams

# OpenAI fields Tandem does not implement, and the values of each that ask for nothing (those are accepted).
NEUTRAL = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,),
}
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; each string is matched on the engine's loop, every token
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[Any] = Field(min_length=1)  # each checked by `chat_messages`, which names the message and part
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None  # accepted; Tandem keeps no per-user state
    keep: str | None = None  # the pair: which reasoning tokens a transfer stage hands over ("all", "attention")
    delta: float | None = None  # the pair, with keep="attention"
    # The fields of NEUTRAL, typed loosely: any value is parsed, then only the neutral ones are accepted.
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def parse_request(body: bytes) -> ChatRequest:
    """The request body, checked field by field: an InputError names the first field at fault."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        raise InputError(validation_message(e)) from None
    for name, neutral in NEUTRAL.items():
        value = getattr(request, name)
        if not any(value == v and type(value) is type(v) for v in neutral):
            raise InputError(f"{name} = {value!r} is not supported by Tandem (leave it out)")
    if request.n != 1:
        raise InputError(f"n = {request.n}: Tandem returns one choice per request, so n must be 1")
    stops = stop_strings(request)
    if len(stops) > MAX_STOPS or any(len(text) > MAX_STOP_CHARS for text in stops):
        raise InputError(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each")
    if request.stream_options is not None and not request.stream:
        raise InputError("stream_options is only for streamed requests (stream: true)")
    return request


def validation_message(error: ValidationError) -> str:
    """pydantic's first complaint, with the field written as a client writes it: messages[0].content."""
    first = error.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    if first["type"] == "extra_forbidden":
        return f"unknown field {where!r}"
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
    return f"{where}: {first['msg']}" if where else first["msg"]


def sampling_params(request: ChatRequest) -> SamplingParams:
    """The engine's params for a single-model request (checked again, by field, as SamplingParams)."""
    return SamplingParams(max_tokens=max_tokens(request) or SamplingParams.max_tokens,
                          temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                          seed=request.seed, stop_token_ids=tuple(request.stop_token_ids or ()),
                          stop=stop_strings(request), ignore_eos=request.ignore_eos)


def max_tokens(request: ChatRequest) -> int | None:
    a, b = request.max_completion_tokens, request.max_tokens
    if a is not None and b is not None and a != b:
        raise InputError(f"max_completion_tokens = {a} and max_tokens = {b} disagree: give one of them")
    return a if a is not None else b


def stop_strings(request: ChatRequest) -> tuple[str, ...]:
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())


async def chat_messages(request: ChatRequest, limits: MediaLimits) -> list[dict]:
    """OpenAI messages -> the engine's: roles mapped (developer is system), text parts kept, each `image_url`
    resolved to its bytes (fetched concurrently). Anything else is refused, naming the message and part."""
    out, fetches = [], []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(f"{where}: must be an object with role and content")
        extra = sorted(set(message) - {"role", "content", "name"})  # name: accepted, unused (no place in the template)
        if extra:
            raise InputError(f"{where}: unsupported field {extra[0]!r} (Tandem takes role, content and name)")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InputError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            content = [_part(part, f"{where}.content[{j}]", fetches) for j, part in enumerate(content)]
        elif not isinstance(content, str):
            raise InputError(f"{where}.content: must be a string or a list of parts")
        out.append({"role": ROLES[role], "content": content})
    if len(fetches) > limits.max_images:
        raise InputError(f"{fetches[limits.max_images][2]}: the request holds {len(fetches)} images, more than this "
                         f"server's limit of {limits.max_images} per request")
    found = await asyncio.gather(*(image_bytes(url, where, limits) for _, url, where in fetches),
                                 return_exceptions=True)
    for (image, _, _), data in zip(fetches, found):
        if isinstance(data, BaseException):
            raise data
        image["image"] = data
    return out


def _part(part: Any, where: str, fetches: list) -> dict:
    if not isinstance(part, dict):
        raise InputError(f"{where}: must be an object with a type")
    kind = part.get("type")
    if kind == "text":
        if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
            raise InputError(f"{where}: a text part is {{\"type\": \"text\", \"text\": \"...\"}}")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec if isinstance(spec, str) else spec.get("url") if isinstance(spec, dict) else None
        if set(part) - {"type", "image_url"} or url is None or (
                isinstance(spec, dict) and (set(spec) - {"url", "detail"}
                                            or spec.get("detail", "auto") not in ("auto", "low", "high"))):
            raise InputError(f"{where}: an image part is {{\"type\": \"image_url\", \"image_url\": {{\"url\": "
                             "\"...\", \"detail\": \"auto\"}}")
        image = {"type": "image", "image": None}
        fetches.append((image, url, f"{where}.image_url"))
        return image
    raise InputError(f"{where}: unsupported part type {kind!r}; expected \"text\" or \"image_url\"")


# ---- what goes back --------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def timings_usage(timings: Timings) -> dict:
    return usage(timings.prompt_tokens, timings.output_tokens)


def completion(id_: str, model: str, text: str, finish_reason: str, usage_: dict, **extra) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_, **extra}


def chunk(id_: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None, **extra) -> dict:
    """One stream chunk: a delta, or (delta None) the usage chunk, whose choices are empty, as OpenAI's are."""
    body = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                   "logprobs": None}]}
    if usage_ is not None:
        body["usage"] = usage_
    return {**body, **extra}


ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "rate_limit_error",
                    "server_error"]


def error(message: str, type_: ErrorType, code: int | str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
