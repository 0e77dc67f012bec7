"""`tandem eval`: accuracy, output tokens and latency per policy on a dataset, in process or through a server.

    tandem eval --large DIR --small DIR --data FILE|easy-vqa --policies large,verify --out DIR
    tandem eval --endpoint http://host:8000/v1 --data FILE --policies tandem-verify --out DIR

The data is read and checked first (data.py). Then each policy in turn answers every sample not yet scored,
`--concurrency` at a time (through the engines' batching, or the server's); each answer is scored (scoring.py)
and appended to samples.jsonl as it comes, so an interrupted run resumes where it stopped. Last, the report
(report.py) is computed from samples.jsonl. The folder's run.json holds the settings that change answers; a
rerun with other settings into the same folder is refused, and so is a second run while one holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import functools
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tandem.bench.eval.data import EASY_VQA, Dataset, Sample, data_url, load_dataset
from tandem.bench.eval.report import summarize, summary_table, write_report
from tandem.bench.eval.scoring import SCORERS, score, scorer_for
from tandem.models.errors import InputError, TandemError
from tandem.runtime.answers import extract_answer
from tandem.runtime.selection import DEFAULT_DELTA, KEEP_MODES
from tandem.runtime.stages import POLICIES, POLICY_PREFIX, Budget

DEFAULT_CONCURRENCY = 8
SAMPLES, RUN = "samples.jsonl", "run.json"
# run.json's fields that change the answers or their latency: a rerun into the same folder must keep them
SETTINGS = ("data", "data_sha256", "scorer", "answerer", "device", "dtype", "keep", "delta", "budget", "temperature",
            "concurrency")


class PairAnswerer:
    """The pair in this process."""

    def __init__(self, pair, keep: str, delta: float):
        self.pair, self.keep, self.delta = pair, keep, delta

    async def answer(self, sample: Sample, policy: str) -> dict:
        result = await self.pair.answer_async(sample.image, sample.prompt, policy, self.keep, self.delta)
        return {"prediction": result.answer, "text": result.final_stage.text, "agreed": result.agreed,
                "latency_s": result.total_s, "stages": [_stage(s) for s in result.to_dict()["stages"]]}

    async def close(self) -> None:
        for engine in self.pair.engines.values():
            engine.close()


class EndpointAnswerer:
    """A running OpenAI-compatible server: a policy is the model id tandem-<policy>; any other id is sent as it is
    (a plain model: the answer is extracted from its reply's content as the pair's are, its usage counts the
    output tokens)."""

    def __init__(self, url: str, api_key: str | None, keep: str, delta: float, temperature: float, timeout: float):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.keep, self.delta, self.temperature = keep, delta, temperature

    async def answer(self, sample: Sample, policy: str) -> dict:
        import httpx

        parts = [{"type": "image_url", "image_url": {"url": data_url(sample.image)}},
                 {"type": "text", "text": sample.prompt}]
        body = {"model": POLICY_PREFIX + policy if policy in POLICIES else policy, "temperature": self.temperature,
                "messages": [{"role": "user", "content": parts}]}
        if policy in ("transfer", "verify"):
            body.update(keep=self.keep, delta=self.delta)
        start = time.perf_counter()
        try:
            response = await self.client.post("/chat/completions", json=body)
        except httpx.ConnectError as e:  # the server is not there: no use trying the other samples
            raise Unreachable(f"--endpoint {self.client.base_url}: {type(e).__name__}: {e}") from None
        except httpx.TimeoutException:
            raise EndpointError(f"no answer within {self.client.timeout.read} s (--timeout)") from None
        except httpx.HTTPError as e:
            raise EndpointError(f"{type(e).__name__}: {e}") from None
        latency = time.perf_counter() - start
        try:
            reply = response.json()
        except ValueError:
            reply = {}
        if response.status_code != 200:
            error = reply.get("error") if isinstance(reply, dict) else None
            message = f"HTTP {response.status_code}: " + (error.get("message") if isinstance(error, dict) else
                                                             response.text[:200])
            if response.status_code in (401, 403, 404):  # a wrong key or model id fails every sample alike
                raise Unreachable(f"--endpoint {self.client.base_url} refused {body['model']!r}: {message}")
            raise EndpointError(message)
        try:
            content = reply["choices"][0]["message"]["content"] or ""
            tandem = reply.get("tandem")
            if tandem is not None:
                return {"prediction": tandem["answer"], "text": content, "agreed": tandem["agreed"],
                        "latency_s": latency, "stages": [_stage(s) for s in tandem["stages"]]}
            stage = {"model": body["model"], "role": "answer", "output_tokens": reply["usage"]["completion_tokens"]}
        except (KeyError, IndexError, TypeError) as e:
            raise EndpointError(f"a reply not in the chat-completions schema ({type(e).__name__}: {e})") from None
        return {"prediction": extract_answer(content), "text": content, "agreed": None, "latency_s": latency,
                "stages": [stage]}

    async def close(self) -> None:
        await self.client.aclose()


class EndpointError(Exception):
    """A server's refusal of one sample: recorded with the sample (scored 0), retried on a rerun."""


class Unreachable(TandemError):
    """The server cannot be reached: the run stops (what was scored is kept)."""


def _stage(stage: dict) -> dict:
    """What a record keeps of a stage: no suffix ids (a transfer's repeat the reasoning's)."""
    kept = {k: stage[k] for k in ("model", "role", "output_ids", "text", "answer", "finish_reason", "kept_fraction",
                                  "timings") if k in stage}
    return {**kept, "output_tokens": len(stage["output_ids"])}


# ---- the run ------------------------------------------------------------------------------------------------------
def evaluate(answerer, dataset: Dataset, policies: list[str], out: Path, settings: dict, scorer: str | None,
             concurrency: int, progress: bool = True, seed: int = 0) -> dict:
    """Answer and score every sample not yet in out/samples.jsonl under each policy (each sample by `scorer`, or
    if None by its own: scoring.scorer_for), then write the report. The caller holds `open_run(out, settings)`."""
    records = _read_records(out / SAMPLES)
    done = {(r["policy"], r["id"]) for r in records if not r.get("error")}
    todo = [(p, s) for p in policies for s in dataset.samples if (p, s.id) not in done]
    total = len(policies) * len(dataset.samples)
    if total > len(todo):
        print(f"tandem eval: resuming: {total - len(todo)} of {total} answers already scored in {out / SAMPLES}",
              file=sys.stderr)
    pick = functools.partial(scorer_for, default=dataset.scorer, forced=scorer)
    asyncio.run(_answer_all(answerer, todo, out / SAMPLES, pick, concurrency, progress))
    latest = {(r["policy"], r["id"]): r for r in _read_records(out / SAMPLES)}  # a retried sample's last record
    ids = {s.id for s in dataset.samples}
    mine = [r for key, r in latest.items() if key[0] in policies and key[1] in ids]
    report = {"run": {**settings, "samples": len(dataset.samples), "policies": policies,
                      "skipped_rows": dataset.skipped, "python": platform.python_version(),
                      "platform": platform.platform(), **_versions()},
              "policies": summarize(mine, policies, seed)}
    write_report(out, report)
    return report


async def _answer_all(answerer, todo: list[tuple[str, Sample]], path: Path, pick: Callable[[Sample], str],
                      concurrency: int, progress: bool) -> None:
    bar = _progress(len(todo), progress)
    try:
        with path.open("a", encoding="utf-8") as file:
            for policy in dict.fromkeys(p for p, _ in todo):  # one policy at a time: its latencies under its own load
                queue = iter([s for p, s in todo if p == policy])

                async def worker():
                    for sample in queue:
                        record = await _record(answerer, sample, policy, pick(sample))
                        file.write(json.dumps(record, ensure_ascii=False) + "\n")
                        file.flush()
                        bar.update(1)

                workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
                try:
                    await asyncio.gather(*workers)
                finally:  # one failed (or Ctrl-C): the others stop before the file and the answerer close
                    for task in workers:
                        task.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
    finally:
        bar.close()
        await answerer.close()


async def _record(answerer, sample: Sample, policy: str, scorer: str) -> dict:
    base = {"id": sample.id, "policy": policy, "group": sample.group, "category": sample.category,
            "answers": list(sample.answers), "scorer": scorer}
    try:
        answer = await answerer.answer(sample, policy)
    except (InputError, EndpointError) as e:  # this sample cannot be answered: recorded, and the run goes on
        return {**base, "error": str(e), "prediction": "", "text": "", "score": 0.0, "latency_s": 0.0, "stages": []}
    return {**base, **answer, "score": score(scorer, answer["prediction"], sample)}


def _read_records(path: Path) -> list[dict]:
    """The records so far. A last line without its newline was cut short by an interrupted write: it is dropped
    from the file (that answer is made again). Any other line that does not parse stops the run, naming it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as file:
            file.truncate(len(complete))
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            fix = "remove the line or give another --out"
            raise InputError(f"{path}, line {number}: not a record ({e}); {fix}") from None
    return records


def open_run(out: Path, settings: dict):
    """Make the run's folder, or check that the run already in it had the same settings (SETTINGS); and lock it
    against a second run at once. Returns the lock: the folder is this process's while it is open."""
    out.mkdir(parents=True, exist_ok=True)
    lock = (out / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise InputError(f"{out} is in use by another tandem eval run; wait for it or give another --out") from None
    path = out / RUN
    if path.exists():
        before = json.loads(path.read_text())
        changed = [k for k in SETTINGS if before.get(k) != settings.get(k)]
        if changed:
            lock.close()
            raise InputError(f"{path.parent} holds a run with other settings ({changed[0]}: "
                             f"{before.get(changed[0])!r}, now {settings.get(changed[0])!r}); give another --out")
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return lock


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="answer", disable=not enabled or total == 0, file=sys.stderr)


def _versions() -> dict:
    import torch

    versions = {"torch": torch.__version__}
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


# ---- the command ---------------------------------------------------------------------------------------------------
def add_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval", help="accuracy, output tokens and latency per policy on a dataset (JSONL, VLMEvalKit TSV, easy-vqa)",
        description="Score the pair's policies on a dataset, in process or through a running server; writes "
                    "samples.jsonl (as it goes: a rerun resumes), report.json, summary.txt and two plots.")
    source = p.add_argument_group("what answers (the pair, or --endpoint)")
    source.add_argument("--large", metavar="DIR|ID", help="the pair's large model")
    source.add_argument("--small", metavar="DIR|ID", help="the pair's small model")
    source.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    source.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default bfloat16 on cuda, float32 on the CPU")
    source.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server, e.g. http://host:8000/v1")
    source.add_argument("--api-key", metavar="KEY", help="with --endpoint: sent as Authorization: Bearer KEY")
    source.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="with --endpoint: seconds one answer may take (default: %(default)s)")
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="FILE|easy-vqa",
                      help="a .jsonl file (image, question, answer[, choices, hint, category, id] per line), a "
                           "VLMEvalKit .tsv (MMBench, POPE, ChartQA, RealWorldQA, InfoVQA), or easy-vqa")
    data.add_argument("--limit", type=int, metavar="N", help="the first N samples")
    data.add_argument("--skip-bad-rows", action="store_true", help="leave malformed rows out (each is reported) "
                                                                   "instead of stopping before any model work")
    data.add_argument("--scorer", choices=sorted(SCORERS),
                      help="default: by dataset (choice for options, yesno for POPE, relaxed for ChartQA, anls for "
                           "InfoVQA, else exact)")
    pol = p.add_argument_group("policies")
    pol.add_argument("--policies", default="large,small-reason,transfer,verify", metavar="P,...",
                     help=f"of {', '.join(POLICIES)} (a tandem- prefix is dropped); with --endpoint also any model id "
                          "(default: %(default)s)")
    pol.add_argument("--keep", choices=KEEP_MODES, default="all", help="transfer / verify: reasoning tokens kept")
    pol.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="with --keep attention: attention mass kept")
    pol.add_argument("--short-tokens", type=int, default=Budget.short_tokens, metavar="N")
    pol.add_argument("--reason-tokens", type=int, default=Budget.reason_tokens, metavar="N")
    pol.add_argument("--temperature", type=float, default=0.0, help="every stage's (default 0: greedy)")
    pol.add_argument("--speculative", type=int, default=0, metavar="K",
                     help="the large model's stages drafted by the small model, K tokens at a time (default: off)")
    run = p.add_argument_group("the run")
    run.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                     help="answers in flight at once (default: %(default)s)")
    run.add_argument("--out", type=Path, required=True, help="the run's folder (a rerun into it resumes)")
    run.add_argument("--seed", type=int, default=0, help="of the bootstrap intervals")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    pair = args.large is not None or args.small is not None
    if pair == (args.endpoint is not None) or (pair and None in (args.large, args.small)):
        raise InputError("give --large DIR and --small DIR (the pair in this process), or --endpoint URL")
    if args.concurrency < 1 or (args.limit is not None and args.limit < 1):
        raise InputError("--concurrency and --limit must be positive integers")
    policies = list(dict.fromkeys(_policy(p.strip()) for p in args.policies.split(",") if p.strip()))
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or (unknown and not args.endpoint):
        what = unknown[0] if unknown else args.policies
        raise InputError(f"--policies: {what!r} is not one of {', '.join(POLICIES)}")
    budget = Budget(short_tokens=args.short_tokens, reason_tokens=args.reason_tokens, temperature=args.temperature,
                    speculative=args.speculative)
    dataset = load_dataset(args.data, args.skip_bad_rows, args.limit)  # every row checked before any model work
    for line in dataset.skipped:
        print(f"tandem eval: skipped {args.data} {line}", file=sys.stderr)
    if not dataset.samples:
        raise InputError(f"--data {args.data}: no samples")
    settings = {"data": str(args.data), "data_sha256": _fingerprint(args.data), "dataset": dataset.name,
                "scorer": args.scorer or f"{dataset.scorer} (choice where a sample has options)",
                "answerer": args.endpoint or f"{args.large} + {args.small}", "keep": args.keep, "delta": args.delta,
                "budget": None if args.endpoint else vars(budget), "temperature": args.temperature,
                "concurrency": args.concurrency, "device": None if args.endpoint else str(args.device or "auto"),
                "dtype": args.dtype}
    lock = open_run(args.out, settings)  # a clash with the folder's earlier run is told before any model loads
    if args.endpoint:
        answerer = EndpointAnswerer(args.endpoint, args.api_key, args.keep, args.delta, args.temperature,
                                    args.timeout)
    else:
        from tandem.runtime import Tandem

        tandem = Tandem.from_pretrained(args.large, args.small, device=args.device, dtype=args.dtype, budget=budget)
        answerer = PairAnswerer(tandem, args.keep, args.delta)
    with lock:
        report = evaluate(answerer, dataset, policies, args.out, settings, args.scorer, args.concurrency,
                          progress=not args.no_progress, seed=args.seed)
    print(summary_table(report))
    print(f"tandem eval: wrote {args.out}/report.json, summary.txt, samples.jsonl and the plots", file=sys.stderr)
    return 0


def _fingerprint(data: str) -> str:
    """The data file's SHA-256 (easy-vqa: its package's version): records must not land on edited samples."""
    if data == EASY_VQA:
        from importlib.metadata import version

        return f"easy-vqa {version('easy-vqa')}"
    digest = hashlib.sha256()
    with open(data, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _policy(name: str) -> str:
    """A policy by its name or its server id (tandem-verify: verify); any other id as it is."""
    bare = name.removeprefix(POLICY_PREFIX)
    return bare if bare in POLICIES else name
