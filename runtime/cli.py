"""The `tandem` command: `generate` (one model), `ask` (the large + small pair), `demo`, and the commands other
installed packages register in the entry-point group "tandem.commands" (`bench`, from tandem.bench)."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from importlib.metadata import entry_points
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

    # Commands of other installed packages (tandem.bench's `bench`): registered through the entry-point group, so
    # the runtime never imports what measures it.
    for command in entry_points(group="tandem.commands"):
        command.load()(commands)
    return parser


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


def _format_timings(t: Timings) -> str:
    return (f"vision {1000 * t.vision_s:.1f} ms | prefill {1000 * t.prefill_s:.1f} ms for {t.prompt_tokens} tokens "
            f"({t.image_tokens} image) | decode {t.decode_ms_per_token:.2f} ms/token for {t.output_tokens} tokens")


if __name__ == "__main__":
    sys.exit(main())
