"""Speculative decoding: a draft engine proposes k tokens, the target engine checks them in one forward of k + 1
positions over its paged cache (where decode steps replay CUDA graphs and k + 1 <= 16, a decode-shaped step of
one row per position: the runner's short chunks) and keeps the longest prefix it agrees with, plus one token of
its own.

Each engine prefills the prompt into a sequence of the generation's own, admitted with the cache room of the
whole reply (`room`, as much as a plain request of max_tokens holds), and keeps it between rounds. Each round
writes into it in place (`in_place`: no fork, no page taken or copied, no wait for pages) and the rejected tokens
are cut off again (`Sequence.truncate`): a round costs the draft k steps and the target one forward, each in its
own engine's loop, batched with whatever else that engine serves. So that no two speculations can each hold a part
of what they need and wait for the other's, the two first requests of every speculation are posted together: on
every engine they queue in one order, and an engine admits first come first served (a request waiting for pages
holds back those behind it that need pages), so a speculation waiting for its second part waits only for work
that ends.

Greedy, the output is the target's own greedy output, token for token (on CUDA up to the rounding that differs
between a step of one row and one of k + 1, as between batch sizes). Sampled, the draft draws its k tokens with the
target's params in one request that keeps the weights each was drawn from (their softmax: its distributions q)
and the standard rejection rule (`accept_drafts`) keeps the output distributed as the target's own sampling. Stop
ids and stop strings end the reply inside a round as they end a plain one; the text streams round by round.

k adapts within [1, k_max]: after a round whose drafts were all kept it grows by one, after one that kept fewer
than half it shrinks by one.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable

import torch

from tandem.models.errors import InputError
from tandem.models.prompt import Prompt
from tandem.runtime.kv_cache import Sequence, release_all
from tandem.runtime.reply_text import ReplyText
from tandem.runtime.request import GenerateOutput, RequestHandle, discard_all
from tandem.runtime.sampling import SamplingParams, filtered_probs, to_device

_POSTING = threading.Lock()  # every speculation's two first requests, posted as one


async def speculate(target, draft, target_prompt: Prompt, draft_prompt: Prompt, params: SamplingParams, k_max: int,
                    target_parent: Sequence | None = None, draft_parent: Sequence | None = None,
                    on_text: Callable[[str], None] | None = None,
                    ready: torch.cuda.Event | None = None) -> GenerateOutput:
    """The `target` engine's generation for `target_prompt` (after `target_parent`), drafted by the `draft` engine
    from `draft_prompt` (the same tokens at the draft's positions, after `draft_parent`). `params`: the target's,
    resolved. on_text(piece) gets the reply's text as it settles (as a stream shows it). `ready`: the event after
    the prompts' ids where they are a device tensor (both engines wait for it). Every sequence it takes goes back
    when it ends, however it ends."""
    check_speculation(target, draft, params, k_max)
    stop_ids = target.stop_ids(params)
    prompt_ids = target_prompt.token_ids if isinstance(target_prompt.token_ids, list) else []
    reply = ReplyText(target.tokenizer, prompt_ids, stop_ids, params.stop)
    tokens: list[int] = []

    def keep(new: list[int]) -> bool:
        """Append the tokens the target settled on, up to a stop id, a stop string or max_tokens; -> it ended."""
        shown = []
        for token in new[: params.max_tokens - len(tokens)]:
            tokens.append(token)
            shown.append(reply.add([token]))
            if token in stop_ids or reply.stopped:
                break
        if on_text is not None and any(shown):
            on_text("".join(shown))
        return tokens[-1] in stop_ids or reply.stopped or len(tokens) == params.max_tokens

    sampled = params.temperature > 0
    rng = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    held: list[Sequence] = []  # the sequences handed over to this generation
    flying: list[RequestHandle] = []  # its requests not yet handed over: discarded if it ends first
    # Neither sequence ever grows past its prompt + max_tokens - 1: a round feeds the target its last token and k
    # drafts, k <= max_tokens - 1 - the tokens so far, and the draft one token fewer.
    room = params.max_tokens - 1
    try:
        # Both prefill the prompt; the target's first token is the first output token, the draft's is not used.
        with _POSTING:
            flying.append(target.submit_stage(target_parent, target_prompt, dataclasses.replace(params, max_tokens=1),
                                              keep_sequence=True, room=room, ready=ready))
            flying.append(draft.submit_stage(draft_parent, draft_prompt, _greedy(draft, 1), keep_sequence=True,
                                             room=room, ready=ready))
        start, primed = await _take(flying[0], flying, held), await _take(flying[-1], flying, held)
        first_at = time.perf_counter()
        seq_t, seq_d, timings = start.seq, primed.seq, dataclasses.replace(start.timings)
        ended = keep(start.token_ids)
        pending = list(tokens)  # output tokens not yet in the draft's cache (the last one not in the target's)
        size = k_max
        while not ended:
            k = min(size, params.max_tokens - len(tokens) - 1)  # the target adds one token of its own
            drafts, q, before_d, before_t = [], None, seq_d.length, seq_t.length
            if k > 0:  # the draft feeds pending and d1 .. d(k-1), and draws d1 .. dk
                flying.append(draft.submit_stage(seq_d, _after(seq_d, draft_prompt, pending),
                                                 _draft_params(draft, params, k, rng), keep_sequence=True,
                                                 in_place=True, token_logits=sampled))
                proposed = await _take(flying[-1], flying, held)
                drafts = proposed.token_ids
                q = proposed.logits.double().softmax(dim=-1) if sampled else None  # what each was drawn from
            flying.append(target.submit_verify(seq_t, _after(seq_t, target_prompt, [tokens[-1], *drafts])))
            verified = await _take(flying[-1], flying, held)
            if sampled:
                accepted, last = accept_drafts(drafts, q, filtered_probs(verified.logits, params), rng)
            else:
                best = verified.best.tolist()  # the target's token after each of t, d1, ..., dk
                accepted = next((i for i, (d, b) in enumerate(zip(drafts, best)) if d != b), len(drafts))
                last = best[accepted]
            seq_t.truncate(before_t + 1 + accepted)  # t and the drafts it kept
            new = [*drafts[:accepted], last]
            if drafts:  # the draft fed pending and d1 .. d(k-1): it keeps those the target kept
                kept = min(accepted, len(drafts) - 1)
                seq_d.truncate(before_d + len(pending) + kept)
                pending = [*drafts[kept:accepted], new[-1]]
            else:
                pending.append(new[-1])
            ended = keep(new)
            timings.drafted += len(drafts)
            timings.accepted += accepted
            timings.verify_forwards += 1
            if drafts and accepted == len(drafts):
                size = min(k_max, size + 1)
            elif 2 * accepted < len(drafts):
                size = max(1, size - 1)
    finally:
        try:
            await discard_all(flying)  # first: a request still running may be writing into a held sequence
        finally:
            release_all(held)
    timings.output_tokens, timings.decode_s = len(tokens), time.perf_counter() - first_at
    tail = reply.finish()
    if on_text is not None and tail:
        on_text(tail)
    stopped = tokens[-1] in stop_ids
    if reply.stopped:  # as a plain request: the text cut before the stop string, the ids up to where it ended
        text, stopped = reply.final, True
    else:
        text = target.tokenizer.decode(tokens[:-1] if stopped else tokens)
    return GenerateOutput(text, tokens, "stop" if stopped else "length", timings)


def check_speculation(target, draft, params: SamplingParams, k_max) -> None:
    """Refuse, before any work, what speculation cannot do."""
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise InputError(f"speculative must be a positive number of draft tokens, got {k_max!r}")
    widths = target.model.config.text.vocab_size, draft.model.config.text.vocab_size
    if widths[0] != widths[1]:
        raise InputError(f"the draft's vocabulary ({widths[1]} logits) differs from the target's ({widths[0]})")


async def _take(handle: RequestHandle, flying: list[RequestHandle], held: list[Sequence]):
    """The outcome of a request in `flying`; its sequence, handed over (or back, in place), is in `held` at once."""
    out = await handle.result_async()
    if out.seq not in held:
        held.append(out.seq)
    flying.remove(handle)
    if getattr(out, "ready", None) is not None:  # CUDA: the logits are written on the engine's stream
        out.ready.synchronize()
    return out


def accept_drafts(drafts: list[int], q: torch.Tensor | None, p: torch.Tensor,
                  rng: torch.Generator) -> tuple[int, int]:
    """The rejection rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft d_i, drawn from
    q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first refused, the token is drawn from
    max(0, p_i - q_i) normalized; when all are kept, one more from p_k. Every token then follows the target's p.
    -> (drafts kept, the token after them). q: [len(drafts), vocab] (None without drafts), p: [len(drafts) + 1,
    vocab], float64. It all runs on p's device, drawing from a generator there seeded from `rng`, and the host
    reads the outcome once; the last token is drawn by an exponential race (argmax of row / Exp(1) noise)."""
    k, vocab, device = len(drafts), p.shape[1], p.device
    if p.shape[0] != k + 1 or (q.shape[0] if k else 0) != k:
        raise ValueError(f"accept_drafts: {k} drafts need {k} rows of q and {k + 1} of p")
    draws = torch.Generator(device).manual_seed(int(torch.randint(0, 2**63 - 1, (), generator=rng)))
    q = torch.cat([q.to(device), p.new_zeros(1, vocab)]) if k else p.new_zeros(1, vocab)  # row k: nothing drafted
    uniforms = torch.rand(k, dtype=torch.float64, device=device, generator=draws)
    rows, ids = torch.arange(k, device=device), to_device(drafts, torch.int64, device)
    refused = (uniforms * q[rows, ids] >= p[rows, ids]).long()
    first = (k - refused.cumsum(0).clamp_max(1).sum()).view(1)  # the first refused draft, or k when none was
    p_first = p.index_select(0, first)[0]  # (indexing by a device scalar would read it on the host)
    residual = (p_first - q.index_select(0, first)[0]).clamp_min(0)  # at index k: p_k itself
    row = torch.where(residual.sum() > 0, residual, p_first)  # q_i = p_i exactly leaves no residual: p_i then
    race = torch.empty_like(row).exponential_(generator=draws).clamp_min_(torch.finfo(row.dtype).tiny)
    token = (row / race).argmax()
    kept, last = torch.cat([first, token.view(1)]).tolist()
    return kept, last


def _greedy(draft, n: int) -> SamplingParams:
    """The draft's params: n greedy tokens, never stopping early (the target decides where the text ends)."""
    return draft.resolve(SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def _draft_params(draft, params: SamplingParams, k: int, rng: torch.Generator) -> SamplingParams:
    """A round's draft params: k tokens, greedy, or drawn with the target's filters and a seed of the round's own
    (so each round's draws are fresh, and a seeded generation is reproducible); never stopping early."""
    if params.temperature == 0:
        return _greedy(draft, k)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=rng))
    return draft.resolve(SamplingParams(max_tokens=k, temperature=params.temperature, top_p=params.top_p,
                                        top_k=params.top_k, seed=seed, ignore_eos=True))


def _after(seq: Sequence, prompt: Prompt, ids: list[int]) -> Prompt:
    """`ids` continuing `seq` (which began with `prompt`): their positions go on from its end."""
    return Prompt.continuing(ids, seq.length, prompt.rope_delta)
