"""The HTTP server: the OpenAI chat-completions API, on FastAPI and uvicorn, over one engine or the pair.

Routes: POST /v1/chat/completions, GET /v1/models (with an API key set, these two need it), GET /health,
GET /metrics. A model id names one engine (plain chat), or for a pair a policy (`tandem-verify`, ...). Errors are
OpenAI-shaped JSON: bad input 400 (the message names the field), wrong or missing key 401, unknown model 404, a
full queue 429, a closed engine 503. A client that disconnects aborts its request: its pages come back at the
engine's next step. Each request's model work runs in the engines' loop threads; the event loop checks and
tokenizes it and moves bytes, and a worker thread decodes its images (a large one takes a second), so no request
stalls the others' streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tandem.models.errors import InputError, TandemError
from tandem.runtime import openai_api as api
from tandem.runtime.engine import Engine
from tandem.runtime.loop import off_loop
from tandem.runtime.media import DEFAULT_MAX_REQUEST_BYTES, MediaLimits
from tandem.runtime.metrics import CONTENT_TYPE, Metrics
from tandem.runtime.pipeline import Tandem
from tandem.runtime.request import QueueFullError, RequestAborted
from tandem.runtime.selection import DEFAULT_DELTA
from tandem.runtime.stages import POLICIES, POLICY_PREFIX, TandemResult

log = logging.getLogger("tandem.server")
# The stage whose text a streamed pair response carries as it decodes; verify's transfer stage runs only when the
# cheap answers disagree (when they agree, the short answer is sent whole at the verdict).
LIVE_ROLE = {"large": "answer", "small": "answer", "small-reason": "reason", "large-reason": "reason",
             "transfer": "transfer", "verify": "transfer"}
PAIR_ONLY = ("keep", "delta")
NOT_FOR_PAIR = ("top_p", "top_k", "seed", "stop", "stop_token_ids")  # a pair's stages sample by temperature alone


class UnknownModel(Exception):
    pass


class Unauthorized(Exception):
    pass


class TooLarge(Exception):
    """A request body over the server's limit."""


class ClientGone(Exception):
    """The client disconnected before its response: the request was aborted."""


@dataclass
class Served:
    """What a server answers with: model id -> engine, and with a pair one id per policy."""

    engines: dict[str, Engine]
    pair: Tandem | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def one(cls, name: str, engine: Engine) -> "Served":
        return cls({name: engine})

    @classmethod
    def of_pair(cls, pair: Tandem, large: str, small: str) -> "Served":
        if large == small:
            raise InputError(f"the pair's two models have one name, {large!r}: name them apart")
        return cls({large: pair.engines["large"], small: pair.engines["small"]}, pair)

    @property
    def ids(self) -> list[str]:
        policies = [POLICY_PREFIX + p for p in POLICIES] if self.pair is not None else []
        return [*self.engines, *policies]

    def policy(self, model: str) -> str | None:
        """The pair's policy a model id names, or None for an engine's id; UnknownModel for anything else."""
        if model in self.engines:
            return None
        if self.pair is not None and model.removeprefix(POLICY_PREFIX) in POLICIES and model.startswith(POLICY_PREFIX):
            return model.removeprefix(POLICY_PREFIX)
        raise UnknownModel(f"model {model!r} does not exist; this server has: {', '.join(self.ids)}")

    def vision_caches(self) -> list:
        caches = (e.vision_cache for e in self.engines.values() if e.vision_cache is not None)
        return list({id(c): c for c in caches}.values())

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    media: MediaLimits = MediaLimits()
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger body is refused (413) before it is parsed
    access_log: bool = True  # uvicorn's line per request


def build_app(served: Served, config: ServerConfig = ServerConfig()) -> FastAPI:
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None)
    metrics = Metrics(served.engines, served.vision_caches())
    app.state.served, app.state.metrics = served, metrics

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.encode(), config.api_key.encode()):
            raise Unauthorized("a missing or wrong API key: send Authorization: Bearer <key>")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = api.parse_request(await _body(request, config.max_request_bytes))
        policy = served.policy(body.model)  # an unknown id is a 404 before it can become a metrics label
        request.state.model = body.model
        if policy is None:
            response = await _one(served.engines[body.model], body, request)
        else:
            response = await _pair(policy, body, request)
        if not isinstance(response, StreamingResponse):
            metrics.request(body.model, 200)
        return response

    async def _one(engine: Engine, body: api.ChatRequest, request: Request) -> Response:
        given = [name for name in PAIR_ONLY if getattr(body, name) is not None]
        if given:
            raise InputError(f"{given[0]} is for the pair's policies ({POLICY_PREFIX}...), not model {body.model!r}")
        messages = await api.chat_messages(body, config.media)
        params = engine.resolve(api.sampling_params(body))
        if any(p["type"] == "image" for m in messages if isinstance(m["content"], list) for p in m["content"]):
            messages = await off_loop(engine.prepare, messages, max_tokens=params.max_tokens)
        handle = engine.submit(messages, params)
        id_ = api.completion_id()
        if body.stream:
            return _stream(body, id_, _engine_events(body, handle, id_), handle.abort)
        out = await _unless_disconnected(request, handle.result_async())
        metrics.timings(body.model, out.timings)
        return JSONResponse(api.completion(id_, body.model, out.text, out.finish_reason, api.timings_usage(out.timings)))

    async def _engine_events(body, handle, id_) -> AsyncIterator[dict]:
        created = int(time.time())
        yield api.chunk(id_, body.model, created, {"role": "assistant", "content": ""})
        async for piece in handle.stream_async():
            yield api.chunk(id_, body.model, created, {"content": piece})
        out = await handle.result_async()
        metrics.timings(body.model, out.timings)
        yield api.chunk(id_, body.model, created, {}, out.finish_reason)
        if body.include_usage:
            yield api.chunk(id_, body.model, created, None, usage_=api.timings_usage(out.timings))

    async def _pair(policy: str, body: api.ChatRequest, request: Request) -> Response:
        given = [name for name in NOT_FOR_PAIR if getattr(body, name) is not None]
        if given:
            raise InputError(f"{given[0]} is not supported by the pair's policies (model {body.model!r}): their "
                             "stages sample with temperature alone")
        image, question = _image_and_question(await api.chat_messages(body, config.media), body.model)
        budget = _budget(served.pair.budget, policy, body)
        keep, delta = body.keep or "all", DEFAULT_DELTA if body.delta is None else body.delta
        id_ = api.completion_id()
        if body.stream:
            served.pair.check(image, question, policy, keep, delta, budget)  # a refusal is a 400, not an event
            pieces: asyncio.Queue = asyncio.Queue()
            on_text = lambda model, role, piece: role == LIVE_ROLE[policy] and pieces.put_nowait(piece)  # noqa: E731
            work = asyncio.ensure_future(served.pair.answer_async(image, question, policy, keep, delta, on_text,
                                                                  budget))
            return _stream(body, id_, _pair_events(body, id_, work, pieces), work.cancel)
        result = await _unless_disconnected(
            request, served.pair.answer_async(image, question, policy, keep, delta, budget=budget))
        _count_pair(result)
        final = result.final_stage
        return JSONResponse(api.completion(id_, body.model, final.text, final.finish_reason, _pair_usage(result),
                                           tandem=result.to_dict()))

    async def _pair_events(body, id_, work: asyncio.Future, pieces: asyncio.Queue) -> AsyncIterator[dict]:
        created, sent, get = int(time.time()), "", None
        try:
            yield api.chunk(id_, body.model, created, {"role": "assistant", "content": ""})
            while not (work.done() and pieces.empty()):
                get = asyncio.ensure_future(pieces.get())
                await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    continue
                sent += get.result()
                yield api.chunk(id_, body.model, created, {"content": get.result()})
            result: TandemResult = work.result()
            _count_pair(result)
            final = result.final_stage
            if final.text != sent:  # verify's short answer, when the answers agreed: sent whole now
                yield api.chunk(id_, body.model, created, {"content": final.text[len(sent):]})
            yield api.chunk(id_, body.model, created, {}, final.finish_reason, tandem=result.to_dict())
            if body.include_usage:
                yield api.chunk(id_, body.model, created, None, usage_=_pair_usage(result))
        finally:
            work.cancel()  # an error, or a client gone: the pair's stages stop and their pages come back
            if get is not None:
                get.cancel()

    def _count_pair(result: TandemResult) -> None:
        for stage in result.stages:
            metrics.timings(_engine_name(stage.model), stage.timings)
        if result.policy == "verify":
            metrics.verdict(bool(result.agreed))

    def _engine_name(model: str) -> str:
        engine = served.pair.engines[model]
        return next(name for name, e in served.engines.items() if e is engine)

    def _stream(body: api.ChatRequest, id_: str, events: AsyncIterator[dict], stop) -> StreamingResponse:
        """Server-sent events, as OpenAI's; `stop()` ends the work when the stream ends early (a client gone)."""
        async def sse() -> AsyncIterator[str]:
            status = 499  # until the last event is sent: a client that leaves before is counted so
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                status = 200
            except QueueFullError as e:
                status = 429
                yield f"data: {json.dumps(api.error(str(e), 'rate_limit_error', 429))}\n\n"
            except TandemError as e:
                status = 400
                yield f"data: {json.dumps(api.error(str(e), 'invalid_request_error', 400))}\n\n"
            except RequestAborted as e:
                status = 503
                yield f"data: {json.dumps(api.error(str(e), 'server_error', 503))}\n\n"
            except Exception as e:  # noqa: BLE001 - told to the client, logged; the server goes on
                log.exception("a streamed request failed")
                status = 500
                yield f"data: {json.dumps(api.error(f'{type(e).__name__}: {e}', 'server_error', 500))}\n\n"
            finally:
                stop()  # at once: a cancelled task may not get past its next await
                metrics.request(body.model, status)
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": served.created,
                                            "owned_by": "tandem"} for m in served.ids]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def failure(status: int, type_: str, code=None):
        async def handler(request: Request, e: Exception) -> JSONResponse:
            model = getattr(request.state, "model", None)
            if model is not None:
                metrics.request(model, status)
            if status == 500:
                log.error("request failed", exc_info=e)
            message = str(e) if status != 500 else f"{type(e).__name__}: {e}"
            return JSONResponse(api.error(message, type_, code if code is not None else status), status_code=status)
        return handler

    app.add_exception_handler(TandemError, failure(400, "invalid_request_error"))
    app.add_exception_handler(QueueFullError, failure(429, "rate_limit_error"))
    app.add_exception_handler(UnknownModel, failure(404, "not_found_error", "model_not_found"))
    app.add_exception_handler(Unauthorized, failure(401, "authentication_error", "invalid_api_key"))
    app.add_exception_handler(ClientGone, failure(499, "invalid_request_error"))
    app.add_exception_handler(TooLarge, failure(413, "invalid_request_error"))
    app.add_exception_handler(RequestAborted, failure(503, "server_error"))
    app.add_exception_handler(Exception, failure(500, "server_error"))

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error(str(e.detail), type_, e.status_code), status_code=e.status_code)

    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(ProcessHeader)
    return app


class ProcessHeader:
    """Every response names the process that served it (`x-tandem-process: host:pid`): behind a proxy spreading
    requests over replicas, a client can tell them apart. Plain ASGI, so streaming and disconnects pass as they are."""

    def __init__(self, app):
        self.app, self.value = app, f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-tandem-process", self.value)]
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


def _image_and_question(messages: list[dict], model: str):
    """A pair answers one user message holding one image and the question."""
    shape = f"model {model!r} answers one user message holding one image and the question"
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise InputError(f"{shape}; got {len(messages)} messages" + (
            f", the first from {messages[0]['role']!r}" if messages and messages[0]["role"] != "user" else ""))
    content = messages[0]["content"]
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    images = [p["image"] for p in parts if p["type"] == "image"]
    texts = [p["text"] for p in parts if p["type"] == "text" and p["text"].strip()]
    if len(images) != 1:
        raise InputError(f"{shape}; messages[0] holds {len(images)} images")
    if not texts:
        raise InputError(f"{shape}; messages[0] holds no question text")
    return images[0], "\n".join(texts)


def _budget(budget, policy: str, body: api.ChatRequest):
    """The pair's budget for this request: its temperature and ignore_eos, and max_tokens capping the stage whose
    text is returned (the other stages keep the server's budget)."""
    changes = {"ignore_eos": body.ignore_eos or budget.ignore_eos}
    if body.temperature is not None:
        changes["temperature"] = body.temperature
    cap = api.max_tokens(body)
    if cap is not None:
        name = "reason_tokens" if LIVE_ROLE[policy] == "reason" else "short_tokens"
        changes[name] = min(getattr(budget, name), cap)
    return dataclasses.replace(budget, **changes)


def _pair_usage(result: TandemResult) -> dict:
    """A pair's usage: the prompt tokens each stage prefilled and the tokens each generated, over all stages."""
    return api.usage(sum(s.prefilled_tokens for s in result.stages), sum(len(s.output_ids) for s in result.stages))


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, read only up to `limit` bytes: past it, TooLarge."""
    declared = request.headers.get("content-length", "")
    body = bytearray()
    if not (declared.isdigit() and int(declared) > limit):
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                break
        else:
            return bytes(body)
    raise TooLarge(f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)")


async def _unless_disconnected(request: Request, work: Awaitable):
    """`work`'s result, unless the client disconnects first: then the work is cancelled (which aborts its engine
    requests) and ClientGone raised."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone("the client disconnected")
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run_server(served: Served, config: ServerConfig, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM), then close the engines."""
    import uvicorn

    try:
        uvicorn.run(build_app(served, config), host=host, port=port, log_level="info",
                    access_log=config.access_log, timeout_graceful_shutdown=5)
    finally:
        served.close()


__all__ = ["Served", "ServerConfig", "build_app", "run_server"]
