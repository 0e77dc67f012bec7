"""The `tandem` command: `generate` (one model), `ask` (the large + small pair), `demo`, `serve` (the OpenAI API:
runtime/serve.py), and the commands other installed packages register in the entry-point group "tandem.commands"
(`bench`, from tandem.bench).

Everything that can be checked before a weight is loaded is: numbers (by argparse, so the error names the flag),
flags that would have no effect, the engine settings, the images (decoded once, here, and handed on as pixels)
and the checkpoint names. A user's mistake ends in one line, `tandem: error: ...`, and exit status 2; Ctrl-C
ends with what was generated kept on screen, an `[interrupted]` note and exit status 130; anything else is a
bug and keeps its traceback. Printing lives in cli_output.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from importlib import resources
from importlib.metadata import entry_points, version
from pathlib import Path

from tandem.kernels import BACKENDS, use_backend
from tandem.kernels.backend import implementation
from tandem.models.errors import InputError, TandemError
from tandem.models.hub import resolve_checkpoint
from tandem.models.image import load_image
from tandem.runtime.cli_output import StageText, console, format_result, format_timings, generate_json, loading
from tandem.runtime.config import CPU_KV_TOKENS, DEFAULT_PAGE_SIZE, DTYPES, parse_device, parse_dtype
from tandem.runtime.engine import Engine
from tandem.runtime.pipeline import Tandem, shared_kv_tokens
from tandem.runtime.stages import POLICIES, Budget
from tandem.runtime.request import GenerateOutput, RequestHandle
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.selection import DEFAULT_DELTA, KEEP_MODES

DEMO_PROMPT = "Describe this image."
DEMO_IMAGE = Path(str(resources.files("tandem.runtime") / "assets" / "demo.png"))
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)

# The README's "Policies" paragraph, as `ask --help` and `demo --help` show it.
POLICY_HELP = {
    "large": "the large model answers in a few tokens (--short-tokens)",
    "small": "the small model answers in a few tokens",
    "small-reason": "the small model reasons step by step (--reason-tokens), final answer in [[...]]",
    "large-reason": "the large model reasons step by step, final answer in [[...]]",
    "transfer": "the small model reasons; the large one answers with the reasoning's token ids in its\n"
                "prompt (all of them, or with --keep attention the key ones)",
    "verify": "the large model's short answer and the small model's reasoning; if their normalized\n"
              "answers agree, done, else the transfer stage",
}
TRANSFER_POLICIES = ("transfer", "verify")  # the policies with a transfer stage: where --keep and --delta act

# Flags whose parser default is None, so that a command can tell whether the user typed them (a flag that would
# have no effect is refused, not ignored); these defaults are filled in after that check. None: the checkpoint's.
DEFAULTS = {"max_tokens": 64, "temperature": None, "top_p": None, "top_k": None, "seed": None, "policy": "verify",
            "keep": "all", "delta": DEFAULT_DELTA, "short_tokens": Budget.short_tokens,
            "reason_tokens": Budget.reason_tokens, "speculative": 0}
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
PAIR_FLAGS = ("policy", "keep", "delta", "short_tokens", "reason_tokens", "speculative")


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = _parser().parse_args(argv)
        return args.run(args)
    except TandemError as e:
        console.note(f"tandem: error: {e}{_flag_hint(str(e), args)}")
        return 2
    except KeyboardInterrupt:
        console.note("[interrupted]")  # the text decoded so far is already on screen
        return INTERRUPTED


# ---- the parser --------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Qwen3-VL inference: one model (generate), or a large and a small model answering together "
                    "(ask).",
        epilog="exit status: 0 done; 2 a usage or input error, told in one line (tandem: error: ...), checked "
               "before\nany weight loads where it can be; 130 interrupted (Ctrl-C), what was generated kept.")
    parser.add_argument("--version", action="version", version=f"tandem {version('tandem-vlm')}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    gen = _command(commands, "generate", "answer a prompt, about images or none, with one Qwen3-VL checkpoint",
                   "The reply streams to stdout as it is decoded, then a line of timings.")
    gen.add_argument("--model", required=True, metavar="DIR|ID", help=_CHECKPOINT)
    gen.add_argument("--image", action="append", default=[], type=Path,
                     help="an image file; repeat for several, which go in the prompt in order")
    gen.add_argument("prompt", type=_text, help="the text of the user's message, after the images")
    _add_sampling_args(gen)
    _add_output_args(gen, json_help="print the whole output (text, token ids, finish reason, timings) as one line "
                                    "of JSON; the reply streams to stderr")
    _add_engine_args(gen)
    gen.set_defaults(run=_generate)

    ask = _command(commands, "ask", "answer a question about an image with a large and a small model together",
                   _PAIR_EPILOG)
    ask.add_argument("--large", required=True, metavar="DIR|ID", help="the large model: " + _CHECKPOINT)
    ask.add_argument("--small", required=True, metavar="DIR|ID", help="the small model, of the same family")
    ask.add_argument("--image", required=True, action="append", type=Path, help="the image file (exactly one)")
    ask.add_argument("question", type=_text, help="the question about the image")
    _add_pair_args(ask)
    _add_output_args(ask, json_help="print the whole result (answer, stages, timings) as JSON")
    _add_engine_args(ask)
    ask.set_defaults(run=_ask)

    demo = _command(commands, "demo", "the pair pipeline on a bundled image and a tiny random pair; with --model, "
                                      "one model's generate instead", _PAIR_EPILOG)
    demo.add_argument("--model", metavar="DIR|ID", help="run generate with this checkpoint instead of the pair")
    demo.add_argument("--image", action="append", default=[], type=Path,
                      help="an image file (default: the bundled one); several only with --model")
    demo.add_argument("prompt", nargs="?", default=DEMO_PROMPT, type=_text,
                      help=f"the question, or with --model the prompt (default: {DEMO_PROMPT!r})")
    _add_pair_args(demo, "without --model")
    _add_sampling_args(demo, "with --model")
    _add_output_args(demo, json_help="print the result (the pair's, or with --model generate's) as JSON")
    _add_engine_args(demo)
    demo.set_defaults(run=_demo)

    serve = _command(commands, "serve", "serve the OpenAI chat-completions API over one model or the pair",
                     "Model ids: with --model, its name; with the pair, each model's name (plain chat) and one per "
                     "policy,\ntandem-" + ", tandem-".join(POLICIES) + ".")
    from tandem.runtime import serve as serving

    serving.add_arguments(serve, _positive_int, _positive_float)
    _add_engine_args(serve)
    serve.set_defaults(run=lambda args: serving.run(args, _engine_settings(args)))

    # Commands of other installed packages (tandem.bench's `bench`): registered through the entry-point group, so
    # the runtime never imports what measures it.
    for command in entry_points(group="tandem.commands"):
        command.load()(commands)
    return parser


_CHECKPOINT = ("a checkpoint folder (config.json, safetensors, tokenizer) or a Hugging Face model id such as "
               "Qwen/Qwen3-VL-8B-Instruct (from the hub's cache, else downloaded)")


def _policies() -> str:
    lines = ["policies:"]
    for name, text in POLICY_HELP.items():
        first, *rest = text.split("\n")
        lines += [f"  {name:13} {first}", *(" " * 16 + line for line in rest)]
    return "\n".join(lines)


_PAIR_EPILOG = (_policies() + "\n\nEach stage's text streams to stderr as it is decoded; the answer and the stage "
                "table go to stdout.")


def _command(commands, name: str, summary: str, epilog: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                               epilog=epilog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_sampling_args(p: argparse.ArgumentParser, scope: str = "") -> None:
    group = p.add_argument_group(f"sampling ({scope})" if scope else "sampling")
    group.add_argument("--max-tokens", type=_positive_int, metavar="N", help=f"(default: {DEFAULTS['max_tokens']})")
    group.add_argument("--temperature", type=_temperature, metavar="T",
                       help="0 = greedy (default: the checkpoint's generation_config.json)")
    group.add_argument("--top-p", type=_fraction, metavar="P", help="in (0, 1], 1 = off (default: the checkpoint's)")
    group.add_argument("--top-k", type=_count, metavar="K", help="0 = off (default: the checkpoint's)")
    group.add_argument("--seed", type=_seed, metavar="N", help="makes sampling repeatable (default: none)")


def _add_pair_args(p: argparse.ArgumentParser, scope: str = "") -> None:
    group = p.add_argument_group(f"the pair ({scope})" if scope else "the pair")
    group.add_argument("--policy", choices=POLICIES,
                       help=f"which models run which stages, see below (default: {DEFAULTS['policy']})")
    group.add_argument("--keep", choices=KEEP_MODES,
                       help="the reasoning tokens the transfer stage hands to the large model: all, or the fewest "
                            "that received --delta of the attention the small model paid to its reasoning "
                            f"(default: {DEFAULTS['keep']})")
    group.add_argument("--delta", type=_fraction, metavar="D",
                       help="with --keep attention: the share of attention the kept tokens reach, in (0, 1] "
                            f"(default: {DEFAULTS['delta']})")
    group.add_argument("--short-tokens", type=_positive_int, metavar="N",
                       help=f"output tokens of a short answer (default: {DEFAULTS['short_tokens']})")
    group.add_argument("--reason-tokens", type=_positive_int, metavar="N",
                       help=f"output tokens of a reasoning stage (default: {DEFAULTS['reason_tokens']})")
    group.add_argument("--speculative", type=_positive_int, metavar="K",
                       help="the large model's stages (answer, reasoning, transfer) drafted by the small model, up "
                            "to K tokens at a time: the same output in fewer large-model forwards (default: off)")


def _add_output_args(p: argparse.ArgumentParser, json_help: str) -> None:
    p.add_argument("--ignore-eos", action="store_true",
                   help="decode to the full length (--max-tokens; the pair's stages: --short-tokens, "
                        "--reason-tokens), past end-of-sequence tokens (latency studies)")
    p.add_argument("--json", action="store_true", help=json_help)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("engine")
    group.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    group.add_argument("--dtype", choices=DTYPES, help="(default: bfloat16 on cuda, float32 on the cpu)")
    group.add_argument("--kernel-backend", choices=BACKENDS,
                       help="auto: the Triton kernels on cuda, the torch reference elsewhere; triton on the cpu needs "
                            "TRITON_INTERPRET=1 (default: TANDEM_KERNEL_BACKEND, else auto)")
    group.add_argument("--kv-cache-tokens", type=_positive_int, metavar="N",
                       help="KV-cache tokens per model (default: 85%% of the device memory the weights leave free on "
                            f"cuda, shared by a pair; {CPU_KV_TOKENS} on the cpu)")
    group.add_argument("--page-size", type=_positive_int, default=DEFAULT_PAGE_SIZE, metavar="N",
                       help="tokens per KV-cache page (default: %(default)s)")
    group.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                       help="run each decode step eagerly, not replayed as a CUDA graph (default: graphs, unless "
                            "TANDEM_CUDA_GRAPHS=0)")


def _number(kind: type, accepts: Callable[[float], bool], what: str) -> Callable[[str], int | float]:
    """An argparse type: argparse names the flag in the error (`argument --top-p: must be ...`)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_count = _number(int, lambda v: v >= 0, "an integer >= 0")
_seed = _number(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")
_temperature = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ---- the commands ------------------------------------------------------------------------------------------------
def _generate(args: argparse.Namespace) -> int:
    _fill_defaults(args)
    settings = _engine_settings(args)
    _run_generate(args, settings, args.model, _decoded(args.image))
    return 0


def _ask(args: argparse.Namespace) -> int:
    _check_pair_flags(args, _fill_defaults(args))
    image = _one_image(args.image)
    settings = _engine_settings(args)
    _run_pair(args, settings, args.large, args.small, load_image(image, 0), args.question)
    return 0


def _demo(args: argparse.Namespace) -> int:
    typed = _fill_defaults(args)
    images = args.image or [DEMO_IMAGE]
    if args.model is not None:
        _refuse_typed(typed, PAIR_FLAGS, "no effect with --model, which runs one model's generate (these set the "
                                          "pair's stages)")
        settings = _engine_settings(args)
        decoded = _decoded(images)
        console.write(f"image: {', '.join(map(str, images))}\nprompt: {args.prompt}\n\n", err=args.json)
        _run_generate(args, settings, args.model, decoded)
        return 0
    _refuse_typed(typed, SAMPLING_FLAGS, "no effect without --model: these set one model's generate (demo --model "
                                         "DIR); the pair's lengths are --short-tokens and --reason-tokens")
    _check_pair_flags(args, typed)
    image = _one_image(images)
    settings = _engine_settings(args)
    decoded = load_image(image, 0)
    from tandem.models.tiny import cached_tiny_checkpoint  # builds them with transformers on first use

    large, small = cached_tiny_checkpoint("8b-like"), cached_tiny_checkpoint("2b-like")
    console.write(f"large: tiny random 8B-like Qwen3-VL at {large}\nsmall: tiny random 2B-like Qwen3-VL at {small}\n"
                  "       their weights are random, so the text below is noise: this shows the pipeline, not a "
                  f"model.\nimage: {image}\nquestion: {args.prompt}\n\n", err=args.json)
    _run_pair(args, settings, large, small, decoded, args.prompt)
    return 0


def _run_generate(args: argparse.Namespace, settings: dict, model: str, images: list) -> None:
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    engine = _load("model", model, resolve_checkpoint(model), settings)
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": args.prompt}]
    handle = engine.submit([{"role": "user", "content": content}], sampling)
    out = _reply(handle, lambda piece: console.write(piece, err=args.json))
    if args.json:
        console.end_line(err=True)
        console.write(generate_json(out) + "\n")
    else:
        console.end_line()
        dtype = str(engine.dtype).removeprefix("torch.")
        console.write(f"\n[{out.finish_reason}] {format_timings(out.timings)}  ({engine.device}, {dtype})\n")


def _reply(handle: RequestHandle, on_text: Callable[[str], None]) -> GenerateOutput:
    """The whole output, each piece of its text passed to on_text as it is decoded (Ctrl-C aborts the request)."""
    for piece in handle.stream():
        on_text(piece)
    return handle.result()


def _run_pair(args: argparse.Namespace, settings: dict, large: str, small: str, image, question: str) -> None:
    budget = Budget(short_tokens=args.short_tokens, reason_tokens=args.reason_tokens, ignore_eos=args.ignore_eos,
                    speculative=args.speculative)
    paths = {"large": resolve_checkpoint(large), "small": resolve_checkpoint(small)}  # both, before either loads
    if args.kv_cache_tokens is None:  # the two caches share one device's memory
        settings = {**settings, "kv_cache_tokens": shared_kv_tokens(list(paths.values()), settings["device"],
                                                                     settings["dtype"])}
    engines = [_load(role, given, paths[role], settings) for role, given in (("large", large), ("small", small))]
    pair = Tandem(*engines, budget=budget)
    stages = StageText(overlapped=pair.overlap and args.policy == "verify")  # only verify runs two stages at once
    try:
        result = pair.answer(image, question, policy=args.policy, keep=args.keep, delta=args.delta, on_text=stages)
    finally:
        stages.close()
    console.write((result.to_json() if args.json else format_result(result)) + "\n")


def _load(role: str, given: str, path: Path, settings: dict) -> Engine:
    with loading(role, str(given), path):
        return Engine.from_pretrained(path, **settings)


# ---- checks before any weight loads -----------------------------------------------------------------------------
def _fill_defaults(args: argparse.Namespace) -> set[str]:
    """Give the DEFAULTS flags the user left out their defaults. -> the ones the user typed."""
    typed = {name for name in DEFAULTS if getattr(args, name, None) is not None}
    for name, value in DEFAULTS.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
    return typed


def _refuse_typed(typed: set[str], names: tuple[str, ...], why: str) -> None:
    flags = [_flag(name) for name in names if name in typed]
    if flags:
        raise InputError(f"{', '.join(flags)}: {why}")


def _check_pair_flags(args: argparse.Namespace, typed: set[str]) -> None:
    """--keep and --delta act on the transfer stage only: refused where they would change nothing."""
    if args.keep == "attention" and args.policy not in TRANSFER_POLICIES:
        raise InputError(f"--keep attention has no effect with --policy {args.policy}: it picks the reasoning tokens "
                         f"the transfer stage hands to the large model, and only {' and '.join(TRANSFER_POLICIES)} "
                         "have one")
    if "delta" in typed and args.keep != "attention":
        raise InputError(f"--delta has no effect with --keep {args.keep}: it is the share of attention the tokens "
                         "kept by --keep attention reach")


def _one_image(images: list[Path]) -> Path:
    if len(images) != 1:
        raise InputError(f"the pair answers about one image; --image was given {len(images)} times")
    return images[0]


def _decoded(images: list[Path]) -> list:
    """Each image decoded here, once (the engine takes the pixels): a bad file is refused before any load."""
    return [load_image(image, i) for i, image in enumerate(images)]


def _engine_settings(args: argparse.Namespace) -> dict:
    """Engine.from_pretrained's settings, checked as it checks them first, but before any checkpoint is read."""
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    try:  # the kernel backend must be able to run on this device
        with use_backend(args.kernel_backend):
            implementation(device)
    except ValueError as e:
        raise InputError(f"kernel backend on {device}: {e}") from e
    return {"device": device, "dtype": dtype, "kv_cache_tokens": args.kv_cache_tokens, "page_size": args.page_size,
            "kernel_backend": args.kernel_backend, "cuda_graphs": args.cuda_graphs}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_hint(message: str, args: argparse.Namespace | None) -> str:
    """The engine's messages name its settings (kv_cache_tokens, max_tokens); here the user sets them by flags."""
    if not hasattr(args, "kv_cache_tokens"):  # not one of this module's commands (or no command parsed)
        return ""
    flags = ["--kv-cache-tokens"] if "kv_cache_tokens" in message else []
    if "max_tokens" in message:
        flags += ["--max-tokens"] if getattr(args, "model", None) else ["--short-tokens", "--reason-tokens"]
    return f" (flags: {', '.join(flags)})" if flags else ""


if __name__ == "__main__":
    sys.exit(main())
