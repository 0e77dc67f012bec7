"""The `tandem` command: `tandem generate --model DIR --image PATH "prompt"` and `tandem demo`."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from tandem.kernels import BACKENDS
from tandem.models.errors import TandemError
from tandem.runtime.engine import Engine, Timings
from tandem.runtime.sampling import SamplingParams

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

    demo = commands.add_parser("demo", help="generate on a bundled image; a tiny random model when no --model is given")
    demo.add_argument("--model", type=Path, help="checkpoint folder (default: a tiny random Qwen3-VL, built once)")
    demo.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    _add_request_args(demo)
    demo.set_defaults(run=_demo)
    return parser


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


def _demo(args: argparse.Namespace) -> int:
    if args.model is None:
        from tandem.models.tiny import cached_tiny_checkpoint

        args.model = cached_tiny_checkpoint()
        print(f"model: tiny random Qwen3-VL at {args.model}\n"
              "       its weights are random, so the text below is noise: this shows the pipeline, not a model.\n")
    images = args.image or [Path(str(resources.files("tandem.runtime") / "assets" / "demo.png"))]
    engine = _engine(args)
    print(f"image: {', '.join(map(str, images))}\nprompt: {args.prompt}\n")
    _run(engine, args, images)
    return 0


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
