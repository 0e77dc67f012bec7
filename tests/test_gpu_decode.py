"""The decode loop on a GPU: no host sync per token, at most one step past a stop, and no dead end when a CUDA graph
cannot be captured. Marked `gpu`: skipped where no CUDA device is present (see conftest.py)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from tandem.models.prompt import Prompt
from tandem.runtime import Engine, SamplingParams

from conftest import random_image

pytestmark = pytest.mark.gpu

MESSAGES = [{"role": "user", "content": [{"type": "image", "image": random_image(200, 260, seed=5)},
                                         {"type": "text", "text": "What is in this image?"}]}]
FORCED = dict(max_tokens=24, ignore_eos=True)
PARAMS = {
    "greedy": SamplingParams(temperature=0.0, **FORCED),
    "top-k then top-p": SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=3, **FORCED),
    "top-p alone": SamplingParams(temperature=1.0, top_k=0, top_p=0.9, seed=4, **FORCED),
}


def engine_for(checkpoint, **kwargs) -> Engine:
    return Engine.from_pretrained(checkpoint, device="cuda", dtype="bfloat16", kv_cache_tokens=4096,
                                  kernel_backend="triton", **kwargs)


@pytest.mark.parametrize("name", PARAMS)
def test_decode_steps_never_sync_the_host(tiny_8b, name):
    """Past the prefill, a generation's steps (graph replay, sampling, stop check, the copy of the tokens to the
    host) run with torch's sync debug mode set to "error": any call that waits for the device raises, in the
    engine's loop thread too (the request then fails with it). The loop waits on one event per step, for a step
    already followed by the next."""
    engine = engine_for(tiny_8b)
    params = PARAMS[name]
    expected = engine.generate(MESSAGES, params).token_ids  # compiles and captures first
    pieces = engine.stream(MESSAGES, params)
    first = next(pieces)
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(pieces)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first + "".join(rest) == engine.tokenizer.decode(expected)
    assert engine.pool.pages_in_use == 0


def test_key_mass_steps_never_sync_the_host(tiny_8b):
    """The reasoning stage's decode, key mass on: no sync either (a stopped row's mass is masked on the device),
    and the mass comes with an event for the reader's stream."""
    engine = engine_for(tiny_8b)
    params = engine.resolve(PARAMS["greedy"])
    prompt = engine.prepare(MESSAGES)
    for debug in ("default", "error"):  # the first run compiles and captures
        handle = engine._submit(prompt, params, key_mass=True)
        pieces = handle.stream()
        next(pieces)
        torch.cuda.set_sync_debug_mode(debug)
        try:
            list(pieces)
            out = handle.result()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out.ready.synchronize()
        assert len(out.token_ids) == params.max_tokens and out.key_mass.sum().item() > 0
    assert engine.pool.pages_in_use == 0


def test_at_most_one_step_runs_past_a_stop(tiny_8b):
    """On CUDA the host reads each step's tokens one step behind the device: a reply that stops at its 4th token
    ran 3 steps for its tokens and at most one more, and is exactly the reply up to that stop."""
    engine = engine_for(tiny_8b)
    assert engine.read_lag == 1
    free = engine.generate(MESSAGES, PARAMS["greedy"]).token_ids
    stop = free[3]
    out = engine.generate(MESSAGES, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop,)))
    n = free.index(stop) + 1
    assert out.token_ids == free[:n] and out.finish_reason == "stop"
    assert n - 1 <= out.timings.decode_steps <= n


def test_a_failed_capture_falls_back_to_eager_steps(tiny_8b):
    """A decode step that cannot be captured (here: a hook that reads a value on the host, which a capture
    forbids) runs eagerly, with a warning naming the shape, and the reply is the one eager steps give."""
    expected = engine_for(tiny_8b, cuda_graphs=False).generate(MESSAGES, PARAMS["greedy"]).token_ids
    engine = engine_for(tiny_8b)
    layer = engine.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args: args[0].sum().item() and None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = engine.generate(MESSAGES, PARAMS["greedy"])
    finally:
        handle.remove()
    assert out.token_ids == expected
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("as a CUDA graph failed" in m and "rows x" in m for m in messages), messages
    assert all(graph is None for buf in engine.runner._buffers.values() for graph in buf.graphs.values())
    # The shape stays eager, with no retry, and on the engine's own stream: a failed capture must not leave the
    # loop on the capture stream, where the events recorded on the engine's stream would no longer order anything.
    streams = []
    handle = layer.register_forward_pre_hook(lambda module, args: streams.append(torch.cuda.current_stream()))
    try:
        assert engine.generate(MESSAGES, PARAMS["greedy"]).token_ids == expected
    finally:
        handle.remove()
    assert streams and all(s == engine._stream for s in streams)
    assert engine.pool.pages_in_use == 0


def test_cuda_graphs_off_by_environment(tiny_8b, monkeypatch):
    monkeypatch.setenv("TANDEM_CUDA_GRAPHS", "0")
    engine = engine_for(tiny_8b)
    assert not engine.runner.graphable()
    engine.generate(MESSAGES, PARAMS["greedy"])
    assert all(not buf.graphs for buf in engine.runner._buffers.values())


def test_short_chunks_replay_graphs_equal_to_eager_steps(tiny_8b):
    """Where steps replay graphs, a text chunk of at most 16 tokens (a speculation's check of its drafts) runs as a
    decode-shaped step, one row per token: a shape's first run is eager, its second is captured, later ones replay.
    Chunks of 3 and 5 tokens after an image prompt, each run 3 times on the same context, give the logits the same
    rows give run eagerly, and those of a prefill up to bfloat16 rounding; a replay runs with no host sync; a
    speculation self-drafted through them gives the tokens it gives with eager rows."""
    ids = [9707, 11, 1246, 525, 498]
    logits, drafted = {}, {}
    for mode in ("prefill", "eager rows", "graph rows"):
        engine = engine_for(tiny_8b, cuda_graphs=mode == "graph rows")
        assert engine.runner.chunk_rows == (16 if mode == "graph rows" else 0)
        engine.runner.chunk_rows = 0 if mode == "prefill" else 16
        prompt = engine.prepare(MESSAGES)
        seq = engine.submit_prefix(prompt).result().seq
        runs = []
        try:
            for n in (3, 5) * 3:
                start = seq.length
                out = engine.submit_verify(seq, Prompt.continuing(ids[:n], start, prompt.rope_delta)).result()
                out.ready.synchronize()
                runs.append(out.logits)
                seq.truncate(start)
            if mode == "graph rows":  # a replayed chunk never waits for the device on the host
                torch.cuda.set_sync_debug_mode("error")
                try:
                    out = engine.submit_verify(seq, Prompt.continuing(ids, seq.length, prompt.rope_delta)).result()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                out.ready.synchronize()
                assert torch.equal(out.logits, runs[-1])
        finally:
            engine.release(seq)
        logits[mode] = runs
        chunk_graphs = [g for buf in engine.runner._chunk_buffers.values() for g in buf.graphs.values()]
        assert bool(engine.runner._chunk_buffers) == (mode != "prefill")
        assert (len(chunk_graphs) == 2 and all(chunk_graphs)) if mode == "graph rows" else not chunk_graphs
        if mode != "prefill":
            drafted[mode] = engine.generate(MESSAGES, PARAMS["greedy"], draft=engine, speculative=3).token_ids
        assert engine.pool.pages_in_use == 0
    for eager, graph, prefill in zip(logits["eager rows"], logits["graph rows"], logits["prefill"]):
        scale = prefill.abs().max().item()
        torch.testing.assert_close(graph, eager, rtol=0, atol=1e-3 * scale)
        torch.testing.assert_close(graph, prefill, rtol=0, atol=3e-2 * scale)
    assert drafted["graph rows"] == drafted["eager rows"]


def test_a_drafted_transfer_reads_its_device_suffix_on_both_engines(tiny_8b, tiny_2b):
    """On CUDA the transfer stage's suffix (the kept reasoning ids spliced into its template) is a device tensor
    written on the caller's stream; drafted, both engines read it behind one event. The stage gets the suffix and
    the first token the plain run gets, runs drafted to its full length, and every page comes back."""
    from tandem.runtime import Budget, Tandem

    large, small = engine_for(tiny_8b), engine_for(tiny_2b)
    budget = Budget(short_tokens=12, reason_tokens=24, temperature=0.0, ignore_eos=True, speculative=3)
    image = random_image(224, 224, seed=1)
    plain, drafted = (Tandem(large, small, budget=b).answer(image, "What is shown?", policy="transfer").stages[-1]
                      for b in (dataclasses.replace(budget, speculative=0), budget))
    assert drafted.role == plain.role == "transfer" and drafted.suffix_ids == plain.suffix_ids
    assert drafted.output_ids[0] == plain.output_ids[0] and len(drafted.output_ids) == 12
    t = drafted.timings
    assert t.verify_forwards > 0 and t.verify_forwards + t.accepted == 11
    assert large.pool.pages_in_use == small.pool.pages_in_use == 0


def test_sampled_speculation_on_cuda_keeps_what_each_draft_was_drawn_from(tiny_8b, tiny_2b):
    """A sampled draft keeps the weights each of its tokens was drawn from: with graphs, every row is computed at
    its own step (not read later from the graph's output buffer, which the next replay overwrites), so inside its
    filters each row equals a prefill's logits over the temperature up to bfloat16 rounding. The rejection rule
    reads the device once. A seeded sampled speculation gives the same reply twice, of full length, drafted by the
    small model or by the target itself (then most drafts kept)."""
    from tandem.runtime.speculative import accept_drafts

    large, small = engine_for(tiny_8b), engine_for(tiny_2b)
    params = large.resolve(PARAMS["top-k then top-p"])
    prompt = large.prepare(MESSAGES)
    kept = large.submit_stage(None, prompt, params, token_logits=True).result()
    kept.ready.synchronize()
    whole = large.prepare(None, [*prompt.token_ids, *kept.token_ids[:-1]], [image for image in prompt.images])
    ref = large.prompt_logits(whole)[len(prompt) - 1 :]
    inside = kept.logits.isfinite()
    assert kept.logits.shape == ref.shape and inside.sum(-1).le(20).all() and inside.any(-1).all()
    tokens = torch.tensor(kept.token_ids, device=inside.device)
    assert inside.gather(1, tokens[:, None]).all()
    torch.testing.assert_close(kept.logits[inside] * params.temperature, ref[inside], rtol=0,
                               atol=3e-2 * ref.abs().max().item())
    q = kept.logits[:3].double().softmax(dim=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            accept_drafts(kept.token_ids[:3], q, kept.logits[:4].double().softmax(dim=-1), torch.Generator())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1  # the outcome's one read
    for draft in (small, large):
        first, again = (large.generate(MESSAGES, PARAMS["top-k then top-p"], draft=draft, speculative=3)
                        for _ in range(2))
        assert first.token_ids == again.token_ids and len(first.token_ids) == 24
        if draft is large:
            assert first.timings.accepted > first.timings.drafted // 2
    assert large.pool.pages_in_use == small.pool.pages_in_use == 0
