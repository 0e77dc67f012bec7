"""Speculative decoding (greedy): the output is the target's own greedy output token for token, with a draft that
disagrees (another random model) and one that always agrees (the same checkpoint: every draft kept, k + 1 tokens
per target forward); speculating and plain requests share the engines; nothing is left holding a page."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.models.errors import InputError
from tandem.models.prompt import Prompt
from tandem.runtime import Budget, Engine, SamplingParams, Tandem
from tandem.runtime.kv_cache import PagePool, Sequence
from tandem.runtime.speculative import accept_drafts

from conftest import random_image, wait_for

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def large(tiny_8b) -> Engine:
    return Engine.from_pretrained(tiny_8b, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def small(tiny_2b) -> Engine:
    return Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def near(tiny_8b, tmp_path_factory) -> Engine:
    """The large checkpoint with noise in its last layer's MLP: a draft that agrees with it often, not always."""
    folder = tmp_path_factory.mktemp("near-8b")
    shutil.copytree(tiny_8b, folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    name = "model.language_model.layers.3.mlp.down_proj.weight"
    noise = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    weights[name] = weights[name] + 0.3 * weights[name].std() * noise
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return Engine.from_pretrained(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def messages():
    return [{"role": "user", "content": [{"type": "image", "image": random_image(64, 80, seed=3)},
                                         {"type": "text", "text": "What is in the picture?"}]}]


@pytest.fixture(scope="module")
def reference(large, messages):
    return large.generate(messages, GREEDY).token_ids


def no_pages(*engines: Engine) -> bool:
    return wait_for(lambda: all(e.pool.pages_in_use == 0 for e in engines))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_a_disagreeing_draft_changes_no_token(large, small, messages, reference, k):
    out = large.generate(messages, GREEDY, draft=small, speculative=k)
    assert out.token_ids == reference and out.finish_reason == "length"
    t = out.timings
    assert t.verify_forwards >= 1 and 0 <= t.accepted <= t.drafted
    assert t.verify_forwards + t.accepted == len(reference) - 1  # each forward: its kept drafts and one token more
    assert no_pages(large, small)


@pytest.mark.parametrize("k", [3, 8])
def test_a_draft_that_agrees_now_and_then_changes_no_token(large, near, messages, reference, k):
    """Some drafts kept, some refused: the rounds that keep a part, and k growing and shrinking, run."""
    out = large.generate(messages, GREEDY, draft=near, speculative=k)
    assert out.token_ids == reference
    t = out.timings
    assert 0 < t.accepted < t.drafted and t.verify_forwards + t.accepted == len(reference) - 1
    assert no_pages(large, near)


def test_rounds_run_as_decode_rows_change_no_token(large, near, messages, reference):
    """Where decode steps replay CUDA graphs, a round's check and the draft's first step run as decode rows (the
    runner's short chunks, one row per token); forced here on the CPU: the same tokens."""
    saved = large.runner.chunk_rows, near.runner.chunk_rows
    large.runner.chunk_rows = near.runner.chunk_rows = 16
    try:
        out = large.generate(messages, GREEDY, draft=near, speculative=3)
    finally:
        large.runner.chunk_rows, near.runner.chunk_rows = saved
    assert out.token_ids == reference and 0 < out.timings.accepted < out.timings.drafted
    assert large.runner._chunk_buffers and near.runner._chunk_buffers  # the rows ran
    assert no_pages(large, near)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_a_draft_that_always_agrees_gives_k_plus_one_tokens_per_forward(large, messages, reference, k):
    out = large.generate(messages, GREEDY, draft=large, speculative=k)
    assert out.token_ids == reference
    t = out.timings
    assert t.accepted == t.drafted > 0  # acceptance 1.0
    assert t.verify_forwards == -(-(len(reference) - 1) // (k + 1))  # k + 1 tokens each (the last may be short)
    assert no_pages(large)


def test_a_stop_token_ends_a_speculative_generation_where_it_ends_a_plain_one(large, small, messages, reference):
    stop = reference[20]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,))
    plain = large.generate(messages, params)
    out = large.generate(messages, params, draft=small, speculative=4)
    assert out.token_ids == plain.token_ids and out.text == plain.text and out.finish_reason == "stop"
    assert no_pages(large, small)


@pytest.fixture(scope="module")
def stop_string(large, messages):
    """Two characters from the middle of the greedy reply's text: a stop string that ends it early."""
    text = large.generate(messages, GREEDY).text
    middle = len(text) // 2
    return text[middle : middle + 2]


@pytest.mark.parametrize("draft, k", [("small", 1), ("small", 4), ("large", 4)])
def test_a_stop_string_ends_a_speculative_generation_where_it_ends_a_plain_one(request, large, messages, stop_string,
                                                                               draft, k):
    """The string may end in a round's first token or inside a run of kept drafts (the self-draft keeps them all);
    the reply ends at the token that completes it, its text cut before it, as a plain request's."""
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, stop=(stop_string,))
    plain = large.generate(messages, params)
    assert plain.finish_reason == "stop" and stop_string not in plain.text and len(plain.token_ids) < 64
    out = large.generate(messages, params, draft=request.getfixturevalue(draft), speculative=k)
    assert (out.token_ids, out.text, out.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
    assert no_pages(large, request.getfixturevalue(draft))


@pytest.mark.parametrize("stop", [(), ("stop string",)])
def test_a_speculative_stream_shows_the_plain_text_round_by_round(large, small, messages, stop_string, stop):
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, stop=tuple(stop_string for _ in stop))
    plain = large.generate(messages, params)
    pieces = list(large.stream(messages, params, draft=large, speculative=3))
    assert "".join(pieces) == plain.text and len(pieces) > 1

    async def run():
        return [piece async for piece in large.stream_async(messages, params, draft=small, speculative=3)]

    assert "".join(asyncio.run(run())) == plain.text
    assert no_pages(large, small)


def test_closing_a_speculative_stream_early_gives_every_page_back(large, small, messages):
    stream = large.stream(messages, GREEDY, draft=small, speculative=2)
    assert next(stream)
    assert large.pool.pages_in_use > 0 and small.pool.pages_in_use > 0
    stream.close()
    assert no_pages(large, small)
    with pytest.raises(InputError, match="positive number of draft tokens"):  # refused at the call, not at next()
        large.stream(messages, GREEDY, draft=small, speculative=-2)
    assert large.generate(messages, GREEDY, draft=small, speculative=2).token_ids  # still usable


def test_speculating_and_plain_requests_share_the_engines(large, small, messages, reference):
    text = [{"role": "user", "content": "Count from one to twenty."}]
    text_reference = large.generate(text, GREEDY).token_ids

    async def run():
        return await asyncio.gather(
            large.generate_async(messages, GREEDY, draft=small, speculative=3),
            large.generate_async(text, GREEDY),
            large.generate_async(text, GREEDY, draft=large, speculative=5),
            large.generate_async(messages, GREEDY),
            small.generate_async(text, GREEDY))

    outs = asyncio.run(run())
    assert [o.token_ids for o in outs[:4]] == [reference, text_reference, text_reference, reference]
    assert outs[4].token_ids == small.generate(text, GREEDY).token_ids
    assert no_pages(large, small)


@pytest.fixture(scope="module")
def cramped(tiny_8b, tiny_2b) -> tuple[Engine, Engine]:
    """The pair with 16 pages of 16 tokens each."""
    return tuple(Engine.from_pretrained(c, device="cpu", dtype="float32", kv_cache_tokens=256, page_size=16)
                 for c in (tiny_8b, tiny_2b))


def in_threads(calls, timeout: float = 300.0) -> list:
    """Each call in a daemon thread of its own, all at once -> their results; fails if any is not done in time."""
    results, threads = [None] * len(calls), []
    for i, call in enumerate(calls):
        threads.append(threading.Thread(target=lambda i=i, call=call: results.__setitem__(i, call()), daemon=True))
        threads[-1].start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "stalled"
    return results


@pytest.mark.parametrize("drafter", ["small", "itself"])
def test_speculations_that_overfill_the_cache_wait_their_turn_and_never_stall(cramped, drafter):
    """Four speculations from four threads at once, each needing over a third of the cache (a self-draft: two
    sequences on one engine): each is admitted with the room of its whole generation, both engines taking them in
    one order, so the first ones run to their end and the others wait for their pages, none of them half-way
    (rounds that took pages as they went would fill the cache with half-done sequences and wait for ever)."""
    large, small = cramped
    draft = small if drafter == "small" else large
    text = [{"role": "user", "content": "Count from one to twenty."}]
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    reference = large.generate(text, params).token_ids
    assert 3 * (len(large.prepare(text)) + len(reference)) > large.pool.capacity_tokens  # two at a time at most
    outs = in_threads([lambda: large.generate(text, params, draft=draft, speculative=4)] * 4)
    assert [o.token_ids for o in outs] == [reference] * 4
    assert no_pages(large, small)


def test_a_speculations_rounds_pass_a_request_that_waits_for_pages(cramped):
    """A stage forked from a held prefix waits for pages that a running speculation holds: the speculation's
    rounds, which need no new page, are admitted past it (else neither would ever move)."""
    large, small = cramped
    text = [{"role": "user", "content": "Count from one to twenty."}]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    reference = large.generate(text, params).token_ids
    prefix = large.submit_prefix(large.prepare(None, list(range(100, 200)))).result().seq  # 7 pages
    try:
        async def run():
            task = asyncio.ensure_future(large.generate_async(text, params, draft=small, speculative=2))
            while large.pool.pages_in_use <= len(prefix.pages):  # the speculation's first request is admitted
                await asyncio.sleep(0.001)
            # 100 + 10 + 75 tokens: 6 pages past the prefix's 6 full ones, more than are free, fewer than could be
            stage = large.submit_stage(prefix, Prompt.continuing([5] * 10, prefix.length, 0),
                                       large.resolve(SamplingParams(max_tokens=76, temperature=0.0)))
            assert large.pool.free_pages < 6 <= large.pool.num_pages - len(prefix.pages)
            out = await asyncio.wait_for(task, timeout=120)
            assert not stage.done  # it still waits: the prefix is held
            return out, stage

        out, stage = asyncio.run(run())
        assert out.token_ids == reference
    finally:
        large.release(prefix)
    assert len(stage.result(timeout=120).token_ids) > 0  # admitted once the prefix went back
    assert no_pages(large, small)


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1, 0.4])
def test_a_cancelled_speculative_generation_gives_every_page_back(large, small, messages, delay):
    async def run():
        task = asyncio.ensure_future(large.generate_async(messages, GREEDY, draft=small, speculative=2))
        while large.pool.pages_in_use == 0 or small.pool.pages_in_use == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(delay)  # while both prefill, or in a later round: drafting or checking
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert no_pages(large, small)


def test_bad_speculative_requests_are_refused(large, small, messages):
    with pytest.raises(InputError, match="another Engine as draft and speculative=k > 0"):
        large.generate(messages, GREEDY, draft=small, speculative=0)
    with pytest.raises(InputError, match="positive number of draft tokens"):
        large.generate(messages, GREEDY, draft=small, speculative=-1)
    assert no_pages(large, small)
    assert large.generate(messages, GREEDY, draft=small, speculative=2).token_ids  # still usable


def test_truncating_a_sequence_keeps_its_pages_for_the_tokens_that_replace_the_cut_ones(tiny_2b):
    engine = Engine.from_pretrained(tiny_2b, device="cpu", dtype="float32", kv_cache_tokens=256)
    pool: PagePool = engine.pool
    seq = Sequence(pool)
    seq.append_slots(40)  # 3 pages of 16
    assert len(seq.pages) == 3 and pool.pages_in_use == 3
    seq.truncate(17)
    assert (seq.length, len(seq.pages), pool.pages_in_use) == (17, 3, 3)
    assert seq.append_slots(2).tolist() == [seq.pages[1] * 16 + 1, seq.pages[1] * 16 + 2]  # where 17, 18 were
    with pytest.raises(ValueError):
        seq.truncate(20)
    seq.release()
    assert pool.pages_in_use == 0


@pytest.mark.parametrize("policy, keep", [("large-reason", "all"), ("large", "all"), ("verify", "all"),
                                          ("transfer", "all"), ("verify", "attention")])
def test_the_pairs_large_stages_drafted_by_the_small_model_are_unchanged(large, small, policy, keep):
    """Every large-model stage runs drafted, the transfer too (its suffix, the kept reasoning ids, is a device
    tensor both models read); on the tiny models verify's answers disagree, so its transfer stage runs."""
    image, question = random_image(64, 80, seed=5), "What is in the picture?"
    plain = Tandem(large, small, budget=Budget(short_tokens=8, reason_tokens=40)).answer(image, question, policy, keep)
    pair = Tandem(large, small, budget=Budget(short_tokens=8, reason_tokens=40, speculative=3))
    pieces = {}
    drafted = pair.answer(image, question, policy, keep,
                          on_text=lambda *p: pieces.setdefault(p[:2], []).append(p[2]))
    assert [s.role for s in drafted.stages] == [s.role for s in plain.stages]
    assert policy not in ("transfer", "verify") or drafted.stages[-1].role == "transfer"
    assert [s.output_ids for s in drafted.stages] == [s.output_ids for s in plain.stages]
    assert [s.kept_indices for s in drafted.stages] == [s.kept_indices for s in plain.stages]
    assert {(s.model, s.role): s.text for s in drafted.stages} == {key: "".join(p) for key, p in pieces.items()}
    if policy == "large-reason":  # 40 tokens drafted 3 at a time: the reasoning streams in several pieces
        assert len(pieces["large", "reason"]) > 1
    assert drafted.answer == plain.answer
    for stage in drafted.stages:
        t = stage.timings
        if stage.model == "large":  # drafted: every token is a kept draft or the target's own
            assert t.verify_forwards > 0 and t.verify_forwards + t.accepted == len(stage.output_ids) - 1
        else:
            assert t.drafted == t.verify_forwards == 0
    assert no_pages(large, small)


def test_a_speculative_budget_counts_draft_tokens():
    with pytest.raises(InputError, match="Budget.speculative must be a number of draft tokens >= 0"):
        Budget(speculative=-1)


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """The p-value of a chi-square goodness-of-fit test over the cells where `expected` > 0."""
    cells = expected > 0
    statistic = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    dof = torch.tensor(int(cells.sum()) - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


@pytest.mark.parametrize("k", [1, 3])
def test_the_rejection_rule_leaves_every_token_distributed_as_the_target(k):
    """Drafts drawn from q, kept or redrawn by the rule: each output position must follow the target's p (here
    the same p at every position), checked by chi-square with fixed seeds, whatever q is (a disagreeing draft, one
    whose support misses tokens p has)."""
    g = torch.Generator().manual_seed(7)
    vocab, trials = 9, 20_000
    p = torch.rand(vocab, generator=g, dtype=torch.float64) ** 2
    p /= p.sum()
    q = torch.rand(vocab, generator=g, dtype=torch.float64)
    q[[0, 4]] = 0  # tokens the draft never proposes
    q /= q.sum()
    rng = torch.Generator().manual_seed(11)
    firsts, seconds = torch.zeros(vocab, dtype=torch.float64), torch.zeros(vocab, dtype=torch.float64)
    for _ in range(trials):
        drafts = torch.multinomial(q, k, replacement=True, generator=rng).tolist()
        kept, last = accept_drafts(drafts, q.expand(k, -1), p.expand(k + 1, -1), rng)
        out = [*drafts[:kept], last]
        firsts[out[0]] += 1
        if len(out) > 1:
            seconds[out[1]] += 1
    assert chi_square_p(firsts, p * trials) > 1e-3
    if k > 1:
        assert chi_square_p(seconds, p * seconds.sum()) > 1e-3
    assert firsts[0] > 0 and firsts[4] > 0  # tokens only the target proposes come out too


def test_without_drafts_the_rule_draws_from_the_target_and_refuses_mismatched_rows():
    """A round with no draft (the reply's last token) draws its one token from p; rows that do not fit the drafts
    are refused, not read past."""
    g = torch.Generator().manual_seed(3)
    p = torch.rand(7, generator=g, dtype=torch.float64) ** 2
    p[2] = 0
    p /= p.sum()
    rng, counts = torch.Generator().manual_seed(4), torch.zeros(7, dtype=torch.float64)
    for _ in range(5000):
        kept, last = accept_drafts([], None, p[None], rng)
        assert kept == 0
        counts[last] += 1
    assert counts[2] == 0 and chi_square_p(counts, p * 5000) > 1e-3
    with pytest.raises(ValueError, match="2 drafts need 2 rows of q and 3 of p"):
        accept_drafts([1, 2], p.expand(3, -1), p.expand(3, -1), rng)


def two_sample_p(a: list[int], b: list[int]) -> float:
    """The p-value of a chi-square test that two samples of tokens come from one distribution (a 2 x cells
    contingency table; cells expected below 5 pooled into one)."""
    tokens = sorted(set(a) | set(b))
    counts = torch.tensor([[x.count(t) for t in tokens] for x in (a, b)], dtype=torch.float64)
    rare = counts.sum(0) < 10
    counts = torch.cat([counts[:, ~rare], counts[:, rare].sum(1, keepdim=True)], dim=1)
    counts = counts[:, counts.sum(0) > 0]
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(counts.shape[1] - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


@pytest.mark.parametrize("draft", ["small", "near"])
def test_sampled_speculation_follows_the_targets_own_sampling(large, small, near, draft):
    """200 seeded 4-token replies (temperature 8 and top-k 3 so that several tokens are likely), drafted 2 at a
    time by a random model (drafts mostly refused) or by a near copy of the target (drafts often kept), against 200
    of the target's own: each position's tokens pass a two-sample chi-square test. The first token is the
    target's own draw in both."""
    text = [{"role": "user", "content": "Say something."}]
    params = [SamplingParams(max_tokens=4, temperature=8.0, top_k=3, seed=s, ignore_eos=True) for s in range(200)]

    async def run(**speculation):
        outs = await asyncio.gather(*(large.generate_async(text, p, **speculation) for p in params))
        return [o.token_ids for o in outs], outs

    own, _ = asyncio.run(run())
    drafted, outs = asyncio.run(run(draft=small if draft == "small" else near, speculative=2))
    assert all(len(t) == 4 for t in drafted)
    kept, proposed = sum(o.timings.accepted for o in outs), sum(o.timings.drafted for o in outs)
    assert kept < proposed and (kept > 0 or draft == "small")  # refused drafts; and kept ones from the near copy
    for position in (1, 2, 3):
        assert two_sample_p([t[position] for t in own], [t[position] for t in drafted]) > 1e-3
    assert no_pages(large, small, near)
