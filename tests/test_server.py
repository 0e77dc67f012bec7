"""`tandem serve` as a client sees it: a real server process on 127.0.0.1 with the tiny pair, driven by the official
`openai` client. Every policy id and each model, streamed and not, against the in-process API on the same
checkpoints (greedy, so the tokens must be equal); images as data, http and file URLs; usage against the token
counts; every error class with its status, followed by a good request; clients that leave free their pages.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tandem.runtime import Budget, SamplingParams, Tandem
from tandem.runtime.cli import DEMO_IMAGE
from tandem.runtime.stages import POLICIES

from conftest import random_image, wait_for
from servers import API_KEY, ServerProcess, data_url, image_message

REASON_TOKENS = 48  # the server's --reason-tokens and the in-process pair's budget
QUESTION = "What is in this image?"
MAX_REQUEST_BYTES = 1 << 20  # the server's --max-request-bytes: far above its tests' requests


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(random_image(96, 128, 1)).save(folder / "a.png")
    Image.fromarray(random_image(80, 64, 2)).save(folder / "b.png")
    (folder / "not-an-image.png").write_bytes(b"\x89PNG but not really")
    return folder


@pytest.fixture(scope="module")
def server(tiny_8b, tiny_2b, images, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    process = ServerProcess(["--large", str(tiny_8b), "--small", str(tiny_2b), "--api-key", API_KEY,
                             "--reason-tokens", str(REASON_TOKENS), "--allowed-local-media-path", str(images),
                             "--max-request-bytes", str(MAX_REQUEST_BYTES)], log)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_8b, tiny_2b) -> Tandem:
    return Tandem.from_pretrained(tiny_8b, tiny_2b, device="cpu", dtype="float32",
                                  budget=Budget(reason_tokens=REASON_TOKENS))


@pytest.fixture(scope="module")
def http_images(images):
    """The images folder over HTTP, from a thread of this process, on 127.0.0.1."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def names(tiny_8b, tiny_2b) -> tuple[str, str]:
    return Path(tiny_8b).name, Path(tiny_2b).name


def streamed(client, **request) -> tuple[str, str, dict, object]:
    """(content, finish_reason, the last chunk's extra fields, usage) of a streamed request."""
    text, finish, extra, usage = "", None, {}, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason is not None:
                finish, extra = chunk.choices[0].finish_reason, chunk.model_extra
        if chunk.usage is not None:
            usage = chunk.usage
    return text, finish, extra, usage


def test_models_lists_each_model_and_one_id_per_policy(client, tiny_8b, tiny_2b):
    ids = [m.id for m in client.models.list()]
    assert ids == [*names(tiny_8b, tiny_2b), *(f"tandem-{p}" for p in POLICIES)]


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_answers_as_the_in_process_pair(client, reference, images, policy):
    messages = image_message(data_url(images / "a.png"), QUESTION)
    expected = reference.answer((images / "a.png").read_bytes(), QUESTION, policy=policy)
    final = expected.final_stage
    usage = (sum(s.prefilled_tokens for s in expected.stages), sum(len(s.output_ids) for s in expected.stages))

    r = client.chat.completions.create(model=f"tandem-{policy}", messages=messages, temperature=0)
    assert r.choices[0].message.content == final.text and r.choices[0].finish_reason == final.finish_reason
    assert r.tandem["answer"] == expected.answer and r.tandem["policy"] == policy
    assert [s["output_ids"] for s in r.tandem["stages"]] == [s.output_ids for s in expected.stages]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == usage
    assert r.usage.total_tokens == sum(usage)

    text, finish, extra, streamed_usage = streamed(client, model=f"tandem-{policy}", messages=messages, temperature=0)
    assert (text, finish) == (final.text, final.finish_reason)
    assert extra["tandem"]["answer"] == expected.answer
    assert (streamed_usage.prompt_tokens, streamed_usage.completion_tokens) == usage


def test_max_tokens_caps_the_returned_stage(client, reference, images):
    messages = image_message(data_url(images / "a.png"), QUESTION)
    r = client.chat.completions.create(model="tandem-small-reason", messages=messages, temperature=0, max_tokens=5)
    budget = dataclasses.replace(reference.budget, reason_tokens=5)
    expected = reference.answer((images / "a.png").read_bytes(), QUESTION, policy="small-reason", budget=budget)
    assert r.choices[0].message.content == expected.final_stage.text
    assert len(r.tandem["stages"][-1]["output_ids"]) <= 5


SINGLE = [
    SamplingParams(max_tokens=12, temperature=0.0),
    SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=5),
    SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=(13,)),
]


@pytest.mark.parametrize("model", ["large", "small"])
@pytest.mark.parametrize("params", SINGLE, ids=["greedy", "seeded", "stop-ids"])
def test_each_model_answers_as_the_in_process_engine(client, reference, images, tiny_8b, tiny_2b, model, params):
    name = dict(zip(("large", "small"), names(tiny_8b, tiny_2b)))[model]
    engine = reference.engines[model]
    system = {"role": "system", "content": "You are terse."}
    messages = [system, *image_message(data_url(images / "b.png"), "Describe it.")]
    expected = engine.generate([system, {"role": "user", "content": [
        {"type": "image", "image": (images / "b.png").read_bytes()}, {"type": "text", "text": "Describe it."}]}],
        params)
    prompt_tokens = len(engine.prepare([system, *[{"role": "user", "content": [
        {"type": "image", "image": (images / "b.png").read_bytes()}, {"type": "text", "text": "Describe it."}]}]]))
    request = dict(model=name, messages=messages, max_tokens=params.max_tokens, temperature=params.temperature,
                   top_p=params.top_p, seed=params.seed,
                   extra_body={"top_k": params.top_k, "ignore_eos": params.ignore_eos,
                               "stop_token_ids": list(params.stop_token_ids)})
    r = client.chat.completions.create(**request)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, len(expected.token_ids))
    text, finish, _, usage = streamed(client, **request)
    assert (text, finish) == (expected.text, expected.finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len(expected.token_ids))


def test_stop_strings_cut_the_reply(client, reference, tiny_2b):
    free = reference.engines["small"].generate("Tell me a story.", SamplingParams(max_tokens=30, temperature=0.0,
                                                                                   ignore_eos=True))
    stop = free.text[8:11]
    request = dict(model=Path(tiny_2b).name, messages=[{"role": "user", "content": "Tell me a story."}],
                   max_tokens=30, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**request)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (free.text[: free.text.find(stop)], "stop")
    assert streamed(client, **request)[:2] == (r.choices[0].message.content, "stop")


def test_an_image_by_http_or_file_url_equals_the_same_by_data_url(client, images, http_images):
    model = "tandem-large"
    answers = [client.chat.completions.create(model=model, messages=image_message(url, QUESTION), temperature=0)
               .choices[0].message.content
               for url in (data_url(images / "a.png"), f"{http_images}/a.png", (images / "a.png").as_uri())]
    assert answers[0] == answers[1] == answers[2]


def good_request(client) -> None:
    r = client.chat.completions.create(model="tandem-small", messages=image_message(data_url(DEMO_IMAGE), QUESTION),
                                       max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


BAD = {  # name: (request changes, status, what the message must say)
    "message role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    "message part": ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
                     "messages[0].content[0]: unsupported part type 'input_audio'"),
    "image bytes": ({"messages": image_message("data:image/png;base64,AAAA", "q")}, 400,
                    "messages[0].content[0].image_url: not a readable image"),
    "image base64": ({"messages": image_message("data:image/png;base64,@@", "q")}, 400, "not valid base64"),
    "image scheme": ({"messages": image_message("ftp://x/a.png", "q")}, 400, "unsupported image URL"),
    "too long": ({"max_tokens": 10**7}, 400, "exceeds the model's context"),
    "top_p": ({"top_p": 5}, 400, "top_p"),
    "n": ({"n": 2}, 400, "n must be 1"),
    "unknown field": ({"extra_body": {"foo": 1}}, 400, "unknown field 'foo'"),
    "unsupported field": ({"logprobs": True}, 400, "logprobs = True is not supported"),
    "stop token id": ({"extra_body": {"stop_token_ids": [10**9]}}, 400, "stop_token_ids[0]"),
    "unknown model": ({"model": "gpt-4o"}, 404, "model 'gpt-4o' does not exist"),
    "role type": ({"messages": [{"role": ["user"], "content": "x"}]}, 400, "messages[0].role"),
    "malformed url": ({"messages": image_message("http://[::1/a.png", "q")}, 400, "image_url: fetching"),
    "stop count": ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop: at most 4 strings"),
    "image count": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(DEMO_IMAGE)}}] * 9}]}, 400,
        "messages[0].content[8].image_url: the request holds 9 images, more than this server's limit of 8"),
    "body size": ({"messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}, 413,
                  f"larger than this server's limit of {MAX_REQUEST_BYTES} bytes"),
    "streamed pair keep": ({"model": "tandem-verify", "messages": image_message(data_url(DEMO_IMAGE), "q"),
                            "stream": True, "extra_body": {"keep": "x"}}, 400, "keep 'x' is not one of"),
    "streamed pair too long": ({"model": "tandem-verify", "stream": True,
                                "messages": image_message(data_url(DEMO_IMAGE), "why " * 70000)}, 400,
                               "tokens of KV cache"),  # refused before the stream's 200
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_get_their_status_and_the_server_goes_on(client, tiny_2b, case):
    changes, status, message = BAD[case]
    request = {"model": Path(tiny_2b).name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
               **changes}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == status
    assert message in caught.value.message
    assert caught.value.body["message"] and caught.value.body["type"]
    good_request(client)


@pytest.mark.parametrize("case", ["two images", "a system message", "top_k", "stop", "keep on one model"])
def test_pair_requests_that_do_not_fit_a_policy_are_refused(client, images, tiny_2b, case):
    one = image_message(data_url(images / "a.png"), QUESTION)
    request = {"model": "tandem-verify", "messages": one}
    if case == "two images":
        request["messages"] = [{"role": "user", "content": one[0]["content"] * 2}]
    elif case == "a system message":
        request["messages"] = [{"role": "system", "content": "Be brief."}, *one]
    elif case == "keep on one model":
        request.update(model=Path(tiny_2b).name, extra_body={"keep": "attention"})
    else:
        request["extra_body"] = {case: 5 if case == "top_k" else ["x"]}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**request)
    good_request(client)


def test_http_and_local_image_refusals_name_the_url(client, http_images, images, tmp_path):
    outside = tmp_path / "outside.png"
    Image.fromarray(random_image(8, 8, 3)).save(outside)
    for url, message in [(f"{http_images}/missing.png", "returned HTTP 404"),
                         (f"{http_images}/not-an-image.png", "not a readable image"),
                         (outside.as_uri(), "outside the directory this server allows")]:
        with pytest.raises(openai.BadRequestError, match="image_url") as caught:
            client.chat.completions.create(model="tandem-large", messages=image_message(url, QUESTION))
        assert message in caught.value.message
    good_request(client)


def test_a_wrong_or_missing_api_key_is_401(server, client):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    missing = httpx.post(server.url + "/v1/chat/completions", json={"model": "tandem-small", "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key
    good_request(client)


def test_a_client_that_leaves_frees_its_pages(server, client, tiny_2b):
    long = {"model": Path(tiny_2b).name, "messages": [{"role": "user", "content": "A long story."}],
            "max_tokens": 6000, "ignore_eos": True, "stream": True}
    gone = server.metric("tandem_requests_total", status="499")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, headers=headers) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: the request is in the engine
        next(lines), next(lines)
        assert server.pages_in_use() > 0
    # Freed long before 6,000 tokens could have been decoded (about 14 s on the CPU machine).
    assert wait_for(lambda: server.pages_in_use() == 0, timeout=5)
    assert wait_for(lambda: server.metric("tandem_requests_total", status="499") == gone + 1, timeout=5)

    # Not streamed: the client gives up waiting (a timeout closes its connection).
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=long["model"], messages=long["messages"], max_tokens=6000,
                                          extra_body={"ignore_eos": True})
    assert wait_for(lambda: server.pages_in_use() == 0, timeout=5)
    assert wait_for(lambda: server.metric("tandem_requests_total", status="499") == gone + 2, timeout=5)
    good_request(client)


def test_metrics_count_what_was_served(server, client, tiny_2b, tmp_path):
    model = Path(tiny_2b).name
    Image.fromarray(random_image(72, 72, 11)).save(tmp_path / "new.png")  # an image no other test sent
    before = {name: server.metric(name, **labels) for name, labels in [
        ("tandem_requests_total", {"model": model, "status": "200"}),
        ("tandem_prompt_tokens_total", {"model": model}), ("tandem_output_tokens_total", {"model": model}),
        ("tandem_time_to_first_token_seconds_count", {"model": model}), ("tandem_vision_cache_hits_total", {})]}
    messages = image_message(data_url(tmp_path / "new.png"), "Again?")
    for _ in range(2):  # the second time, the image's features come from the vision cache
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
    after = {name: server.metric(name, **labels) for name, labels in [
        ("tandem_requests_total", {"model": model, "status": "200"}),
        ("tandem_prompt_tokens_total", {"model": model}), ("tandem_output_tokens_total", {"model": model}),
        ("tandem_time_to_first_token_seconds_count", {"model": model}), ("tandem_vision_cache_hits_total", {})]}
    delta = {name: after[name] - before[name] for name in after}
    assert delta == {"tandem_requests_total": 2, "tandem_prompt_tokens_total": 2 * r.usage.prompt_tokens,
                     "tandem_output_tokens_total": 2 * r.usage.completion_tokens,
                     "tandem_time_to_first_token_seconds_count": 2, "tandem_vision_cache_hits_total": 1}
    client.chat.completions.create(model="tandem-verify", messages=messages, temperature=0)
    assert 0 <= server.metric("tandem_verify_agreement_rate") <= 1
    assert server.metric("tandem_verify_verdicts_total") >= 1


def test_a_full_queue_is_429_and_the_server_goes_on(tiny_2b, tmp_path):
    """One running sequence and one waiting at most: a third request is refused at once, not queued."""
    server = ServerProcess(["--model", str(tiny_2b), "--max-running", "1", "--max-waiting", "1"], tmp_path / "log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        long = {"model": Path(tiny_2b).name, "messages": [{"role": "user", "content": "A long story."}],
                "max_tokens": 6000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response, which aborts the request
            next(lines)
            outcome: list = []
            waiting = threading.Thread(target=lambda: outcome.append(_post(server.url, {**long, "stream": False})))
            waiting.start()
            assert wait_for(lambda: server.metric("tandem_queue_length") == 1, timeout=10)
            with pytest.raises(openai.RateLimitError, match="queue is full"):
                client.chat.completions.create(model=long["model"], messages=long["messages"], max_tokens=4)
            waiting.join()
        assert outcome == ["timed out"]  # it waited in the queue until its client gave up, which aborted it
        assert wait_for(lambda: server.pages_in_use() == 0 and server.metric("tandem_queue_length") == 0, timeout=10)
        r = client.chat.completions.create(model=long["model"], messages=long["messages"], max_tokens=4)
        assert r.usage.completion_tokens == 4
    finally:
        server.stop()


def _post(url: str, body: dict, timeout: float = 3.0) -> int | str:
    """A request's status code, or "timed out" when its client gave up waiting."""
    try:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout).status_code
    except httpx.ReadTimeout:
        return "timed out"
