"""The `tandem` command: `generate` (one model), `ask` (the large + small pair), `demo` and `bench` (latency)."""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib import resources
from pathlib import Path

from tandem.kernels import BACKENDS
from tandem.models.errors import TandemError
from tandem.runtime.engine import Engine, Timings
from tandem.runtime.pipeline import POLICIES, Budget, Tandem, TandemResult
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.selection import DEFAULT_DELTA, KEEP_MODES

DEMO_PROMPT = "Describe this image."


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except TandemError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Qwen3-VL inference runtime")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="answer a prompt about images with a Qwen3-VL checkpoint")
    gen.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, safetensors, tokenizer)")
    gen.add_argument("prompt")
    _add_request_args(gen)
    gen.set_defaults(run=_generate)

    ask = commands.add_parser("ask", help="answer a question about an image with a large and a small model together")
    ask.add_argument("--large", required=True, type=Path, help="the large model's checkpoint folder")
    ask.add_argument("--small", required=True, type=Path, help="the small model's checkpoint folder")
    ask.add_argument("--image", required=True, type=Path)
    ask.add_argument("question")
    _add_pair_args(ask)
    ask.set_defaults(run=_ask)

    demo = commands.add_parser("demo", help="the pair pipeline on a bundled image and a tiny random pair; with "
                                            "--model, one model's generate instead")
    demo.add_argument("--model", type=Path, help="run generate with this checkpoint instead of the pair")
    demo.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    _add_request_args(demo)
    _add_pair_args(demo)
    demo.set_defaults(run=_demo)

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
                       help="a subset of decode,batch,prefill,vision,profile,policies (default: all)")
    bench.add_argument("--lengths", type=_int_list, metavar="L,...", help="output lengths (default 1,2,4,...,1024)")
    bench.add_argument("--image-sizes", type=_int_list, metavar="PX,...",
                       help="square image sides (default 224,448,...,1344)")
    bench.add_argument("--prompt-lengths", type=_int_list, metavar="N,...",
                       help="prefill prompt lengths (default 128,256,...,4096)")
    bench.add_argument("--batch-sizes", type=_int_list, metavar="B,...",
                       help="batch sizes of the batched-decode part (default 1,2,4,8)")
    bench.add_argument("--batch-tokens", type=int, help="tokens each sequence decodes in the batch part (default 128)")
    bench.add_argument("--profile-steps", type=int, help="decode steps the profile part traces (default 64)")
    bench.add_argument("--short-tokens", type=int, default=4, help="forced answer length of the policies (4)")
    bench.add_argument("--reason-tokens", type=int, help="forced reasoning length of the policies (default 256)")
    bench.add_argument("--skip-hf", action="store_true", help="Tandem and the floor only, no transformers columns")
    bench.add_argument("--skip-compile", action="store_true", help="no static cache + torch.compile column")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    bench.set_defaults(run=_bench)
    return parser


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
    from tandem.runtime.benchmark import PARTS

    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are a subset of {','.join(PARTS)}, got {text!r}")
    return parts


def _add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=POLICIES, default="verify")
    p.add_argument("--keep", choices=KEEP_MODES, default="all", help="reasoning tokens handed to the large model")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="attention mass the kept tokens reach")
    p.add_argument("--short-tokens", type=int, default=Budget.short_tokens)
    p.add_argument("--reason-tokens", type=int, default=Budget.reason_tokens)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
        p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
        p.add_argument("--kernel-backend", choices=BACKENDS, help="default: TANDEM_KERNEL_BACKEND, else auto")


def _add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's generation_config)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kernel-backend", choices=BACKENDS, help="default: TANDEM_KERNEL_BACKEND, else auto")


def _generate(args: argparse.Namespace) -> int:
    _run(_engine(args), args, args.image)
    return 0


def _ask(args: argparse.Namespace) -> int:
    _answer(args, args.large, args.small, args.image, args.question)
    return 0


def _demo(args: argparse.Namespace) -> int:
    images = args.image or [Path(str(resources.files("tandem.runtime") / "assets" / "demo.png"))]
    if args.model is not None:
        print(f"image: {', '.join(map(str, images))}\nprompt: {args.prompt}\n")
        _run(_engine(args), args, images)
        return 0
    from tandem.models.tiny import cached_tiny_checkpoint

    large, small = cached_tiny_checkpoint("8b-like"), cached_tiny_checkpoint("2b-like")
    print(f"large: tiny random 8B-like Qwen3-VL at {large}\nsmall: tiny random 2B-like Qwen3-VL at {small}\n"
          "       their weights are random, so the text below is noise: this shows the pipeline, not a model.\n"
          f"image: {images[0]}\nquestion: {args.prompt}\n")
    _answer(args, large, small, images[0], args.prompt)
    return 0


def _answer(args: argparse.Namespace, large: Path, small: Path, image: Path, question: str) -> None:
    pair = Tandem.from_pretrained(large, small, device=args.device, dtype=args.dtype,
                                  kernel_backend=args.kernel_backend,
                                  budget=Budget(short_tokens=args.short_tokens, reason_tokens=args.reason_tokens))
    result = pair.answer(image, question, policy=args.policy, keep=args.keep, delta=args.delta)
    print(result.to_json() if args.json else _format_result(result))


def _format_result(result: TandemResult) -> str:
    lines = [f"answer: {result.answer}", f"policy: {result.policy}" + (
        "" if result.agreed is None else f" (cheap answers {'agreed' if result.agreed else 'disagreed'})"), "",
        f"{'#':>2} {'model':6} {'role':9} {'input':>6} {'prefill':>8} {'output':>7} {'kept':>9} "
        f"{'vision ms':>10} {'prefill ms':>11} {'decode ms':>10}  vision cache"]
    for i, s in enumerate(result.stages, 1):
        kept = "" if s.kept_indices is None else f"{len(s.kept_indices)}/{s.reasoning_tokens}"
        cache = {None: "", True: "hit", False: "miss"}[s.vision_cache_hit]
        lines.append(f"{i:>2} {s.model:6} {s.role:9} {s.input_tokens:>6} {s.prefilled_tokens:>8} "
                     f"{len(s.output_ids):>7} {kept:>9} {1000 * s.vision_s:>10.1f} {1000 * s.prefill_s:>11.1f} "
                     f"{1000 * s.decode_s:>10.1f}  {cache}")
        lines.append(f"   {s.text[:100]!r}")
    lines.append(f"\ntotal {1000 * result.total_s:.1f} ms")
    return "\n".join(lines)


def _engine(args: argparse.Namespace) -> Engine:
    return Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, kernel_backend=args.kernel_backend)


def _run(engine: Engine, args: argparse.Namespace, images: list[Path]) -> None:
    content = [{"type": "image", "image": str(p)} for p in images] + [{"type": "text", "text": args.prompt}]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    out = engine.generate([{"role": "user", "content": content}], sampling)
    print(out.text)
    print(f"\n[{out.finish_reason}] {_format_timings(out.timings)}  ({engine.device}, {str(engine.dtype).removeprefix('torch.')})")


def _bench(args: argparse.Namespace) -> int:
    from tandem.runtime.bench_report import format_summary
    from tandem.runtime.benchmark import PARTS, BenchSettings, run_benchmark

    settings = BenchSettings(
        preset=args.preset, pair=args.pair, device=args.device, dtype=args.dtype, parts=args.parts or PARTS,
        quick=args.quick, repeats=args.repeats, lengths=args.lengths, image_sizes=args.image_sizes,
        prompt_lengths=args.prompt_lengths, batch_sizes=args.batch_sizes, batch_tokens=args.batch_tokens,
        profile_steps=args.profile_steps, short_tokens=args.short_tokens, reason_tokens=args.reason_tokens,
        skip_hf=args.skip_hf, skip_compile=args.skip_compile, kernel_backend=args.kernel_backend, seed=args.seed)
    result = run_benchmark(settings, _bench_command(args), args.out)
    print(format_summary(result))
    print(f"\nwritten: {args.out / 'bench.json'}, latency.png, summary.txt" if args.out
          else "\n(no --out: nothing written)")
    return 0


def _bench_command(args: argparse.Namespace) -> str:
    """The bench command line as parsed, every given option spelled out (bench.json also keeps the process argv)."""
    words = ["tandem", "bench"]
    for name in ("preset", "pair", "device", "dtype", "kernel_backend", "out", "repeats", "parts", "lengths",
                 "image_sizes", "prompt_lengths", "batch_sizes", "batch_tokens", "profile_steps", "short_tokens",
                 "reason_tokens", "seed"):
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    words += [f"--{flag.replace('_', '-')}" for flag in ("quick", "skip_hf", "skip_compile") if getattr(args, flag)]
    return shlex.join(words)


def _format_timings(t: Timings) -> str:
    return (f"vision {1000 * t.vision_s:.1f} ms | prefill {1000 * t.prefill_s:.1f} ms for {t.prompt_tokens} tokens "
            f"({t.image_tokens} image) | decode {t.decode_ms_per_token:.2f} ms/token for {t.output_tokens} tokens")


if __name__ == "__main__":
    sys.exit(main())
