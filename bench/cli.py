"""`tandem bench`: the latency study's subcommand. tandem.runtime's CLI never imports this module: pyproject.toml
registers `add_command` in the entry-point group "tandem.commands", and the `tandem` command adds every
command of that group it finds installed."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from tandem.kernels import BACKENDS


def add_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="latency benchmark on random-weight Qwen3-VL configs: Tandem beside transformers (eager, "
                      "static cache + torch.compile) and the weight-bandwidth floor; writes bench.json, latency.png, "
                      "summary.txt")
    bench.add_argument("--preset", help="model of the decode / prefill / vision parts: qwen3-vl-2b (default), "
                                        "qwen3-vl-4b, qwen3-vl-8b, or the tiny 2b-like / 8b-like (default with "
                                        "--quick or on the CPU)")
    bench.add_argument("--pair", type=_preset_pair, metavar="LARGE,SMALL",
                       help="models of the policies part (default qwen3-vl-8b,qwen3-vl-2b; 8b-like,2b-like with "
                            "--quick or on the CPU)")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                       help="default bfloat16 on cuda, float32 on the CPU")
    bench.add_argument("--kernel-backend", choices=BACKENDS, help="default: TANDEM_KERNEL_BACKEND, else auto")
    bench.add_argument("--out", type=Path, help="folder for bench.json, latency.png and summary.txt (written "
                                                "after each part); without it only the summary is printed")
    bench.add_argument("--quick", action="store_true",
                       help="short lists (3 output lengths, 2 image sizes, 2 prompt lengths), 2 repeats, 32 "
                            "reasoning tokens, tiny models unless --preset / --pair say otherwise")
    bench.add_argument("--repeats", type=int, help="timed runs per configuration, after one warm-up (default 3)")
    bench.add_argument("--parts", type=_bench_parts, metavar="PART,...",
                       help="a subset of decode,batch,concurrency,prefill,vision,check,profile,policies (default: all)")
    bench.add_argument("--lengths", type=_int_list, metavar="L,...", help="output lengths (default 1,2,4,...,1024)")
    bench.add_argument("--image-sizes", type=_int_list, metavar="PX,...",
                       help="square image sides (default 224,448,...,1344)")
    bench.add_argument("--prompt-lengths", type=_int_list, metavar="N,...",
                       help="prefill prompt lengths (default 128,256,...,4096)")
    bench.add_argument("--batch-sizes", type=_int_list, metavar="B,...",
                       help="batch sizes of the batched-decode part (default 1,2,4,8)")
    bench.add_argument("--batch-tokens", type=int, help="tokens each sequence decodes in the batch part (default 128)")
    bench.add_argument("--concurrency", type=_int_list, metavar="C,...",
                       help="request counts of the concurrency part, each run one at a time and at once (default "
                            "1,8,32; 1,16 with --quick or on the CPU)")
    bench.add_argument("--concurrency-tokens", type=int,
                       help="tokens each request decodes in the concurrency part (default 128; 16 with --quick)")
    bench.add_argument("--concurrency-repeats", type=int,
                       help="timed runs per level of the concurrency part (default: --repeats): one at a time, "
                            "its C requests decode one after another")
    bench.add_argument("--check-contexts", type=_int_list, metavar="L,...",
                       help="context lengths of the check part (default 256,1024,4096; 64,256 with --quick)")
    bench.add_argument("--check-tokens", type=_int_list, metavar="N,...",
                       help="chunk sizes of the check part, at most 16 (default 1,2,4,8,16; 1,4 with --quick)")
    bench.add_argument("--profile-steps", type=int, help="decode steps the profile part traces (default 64)")
    bench.add_argument("--short-tokens", type=int, default=4, help="forced answer length of the policies (4)")
    bench.add_argument("--reason-tokens", type=int, help="forced reasoning length of the policies (default 256)")
    bench.add_argument("--skip-hf", action="store_true", help="Tandem and the floor only, no transformers columns")
    bench.add_argument("--skip-compile", action="store_true", help="no static cache + torch.compile column")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (for logs)")
    bench.set_defaults(run=_bench)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _preset_pair(text: str) -> tuple[str, str]:
    names = tuple(n.strip() for n in text.split(","))
    if len(names) != 2 or not all(names):
        raise argparse.ArgumentTypeError(f"expected LARGE,SMALL, got {text!r}")
    return names


def _bench_parts(text: str) -> tuple[str, ...]:
    from tandem.bench.settings import PARTS

    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are a subset of {','.join(PARTS)}, got {text!r}")
    return parts


def _bench(args: argparse.Namespace) -> int:
    from tandem.bench.latency import run_benchmark
    from tandem.bench.latency_report import format_summary
    from tandem.bench.settings import PARTS, BenchSettings

    settings = BenchSettings(
        preset=args.preset, pair=args.pair, device=args.device, dtype=args.dtype, parts=args.parts or PARTS,
        quick=args.quick, repeats=args.repeats, lengths=args.lengths, image_sizes=args.image_sizes,
        prompt_lengths=args.prompt_lengths, batch_sizes=args.batch_sizes, batch_tokens=args.batch_tokens,
        concurrency=args.concurrency, concurrency_tokens=args.concurrency_tokens,
        concurrency_repeats=args.concurrency_repeats, check_contexts=args.check_contexts,
        check_tokens=args.check_tokens, profile_steps=args.profile_steps,
        short_tokens=args.short_tokens, reason_tokens=args.reason_tokens,
        skip_hf=args.skip_hf, skip_compile=args.skip_compile, kernel_backend=args.kernel_backend, seed=args.seed)
    result = run_benchmark(settings, _bench_command(args), args.out, progress=not args.no_progress)
    print(format_summary(result))
    print(f"\nwritten: {args.out / 'bench.json'}, latency.png, summary.txt" if args.out
          else "\n(no --out: nothing written)")
    return 0


def _bench_command(args: argparse.Namespace) -> str:
    """The bench command line as parsed, every given option spelled out (bench.json also keeps the process argv)."""
    words = ["tandem", "bench"]
    for name in ("preset", "pair", "device", "dtype", "kernel_backend", "out", "repeats", "parts", "lengths",
                 "image_sizes", "prompt_lengths", "batch_sizes", "batch_tokens", "concurrency", "concurrency_tokens",
                 "concurrency_repeats", "check_contexts", "check_tokens", "profile_steps", "short_tokens",
                 "reason_tokens", "seed"):
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    words += [f"--{flag.replace('_', '-')}" for flag in ("quick", "skip_hf", "skip_compile") if getattr(args, flag)]
    return shlex.join(words)
