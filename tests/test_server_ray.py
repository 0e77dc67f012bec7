"""Scale-out: `tandem serve --ray --replicas 2` on a local Ray instance (CPU-only replicas), through Ray Serve's
HTTP proxy, answers as the one-process server does, spreads requests over both replicas, and stops on Ctrl-C."""

from __future__ import annotations

import concurrent.futures
import signal
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from conftest import random_image
from servers import ServerProcess, data_url, image_message

pytest.importorskip("ray.serve")

ARGS = ["--reason-tokens", "32"]


@pytest.fixture(scope="module")
def servers(tiny_8b, tiny_2b, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray")
    models = ["--large", str(tiny_8b), "--small", str(tiny_2b), *ARGS]
    one = ServerProcess(models, logs / "one.log")
    try:
        ray = ServerProcess([*models, "--ray", "--replicas", "2"], logs / "ray.log", ready_timeout=240)
    except BaseException:
        one.stop()
        raise
    yield one, ray
    one.stop()
    assert ray.stop(signal.SIGINT, timeout=90) == 0, (logs / "ray.log").read_text()[-3000:]  # Ray's own shutdown


def requests(tiny_2b, image: Path) -> list[dict]:
    messages = image_message(data_url(image), "What is in this image?")
    return [{"model": "tandem-verify", "messages": messages, "temperature": 0},
            {"model": "tandem-transfer", "messages": messages, "temperature": 0},
            {"model": Path(tiny_2b).name, "messages": messages, "max_tokens": 12, "temperature": 0},
            {"model": Path(tiny_2b).name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9,
             "temperature": 0.9, "seed": 4}]


def test_two_ray_replicas_answer_as_the_one_process_server(servers, tiny_2b, tmp_path):
    one, ray = servers
    Image.fromarray(random_image(64, 96, 21)).save(tmp_path / "x.png")
    clients = [openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=120) for s in (one, ray)]
    for request in requests(tiny_2b, tmp_path / "x.png"):
        a, b = (c.chat.completions.create(**request) for c in clients)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage == b.usage
        if request["model"].startswith("tandem-"):
            assert a.tandem["answer"] == b.tandem["answer"]
            assert [s["output_ids"] for s in a.tandem["stages"]] == [s["output_ids"] for s in b.tandem["stages"]]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in clients[1].chat.completions.create(
        stream=True, **requests(tiny_2b, tmp_path / "x.png")[2]) if chunk.choices)
    assert streamed == clients[0].chat.completions.create(**requests(tiny_2b, tmp_path / "x.png")[2]) \
        .choices[0].message.content


def test_the_proxy_spreads_requests_over_both_replicas(servers, tiny_2b):
    _, ray = servers
    body = {"model": Path(tiny_2b).name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24,
            "ignore_eos": True}

    def post(_):
        r = httpx.post(ray.url + "/v1/chat/completions", json=body, timeout=120)
        return r.status_code, r.headers["x-tandem-process"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(32)))
    assert {status for status, _ in answers} == {200}
    assert len({process for _, process in answers}) == 2
