"""The prompt side of `tandem bench`: prefill vs prompt length, and the vision encoder with the first token of a
one-image request vs image size; Tandem beside transformers eager."""

from __future__ import annotations

import torch

from tandem.bench.build import Built, bench_image, forced_greedy, image_question, text_ids
from tandem.bench.settings import BenchSettings
from tandem.bench.timing import Progress, median, to_ms, unavailable
from tandem.kernels.backend import use_backend
from tandem.models.image import preprocess_images
from tandem.runtime.engine import device_clock


def bench_prefill(built: Built, s: BenchSettings, progress: Progress) -> dict:
    engine, device = built.engine, s.torch_device
    params = forced_greedy(1)
    tandem, hf = [], []
    for n in s.prompt_lengths:
        ids = text_ids(n, s.seed + n)
        samples = []
        for i in range(1 + s.repeats):
            out = engine.generate(prompt_token_ids=ids, sampling=params)
            if i:
                samples.append(out.timings.prefill_s)
            progress.step(f"prefill tandem {n} tokens")
        tandem.append(samples)
        if built.hf is not None:
            ids_t = torch.tensor([ids], device=device)
            samples = []
            for i in range(1 + s.repeats):
                with torch.no_grad():
                    start = device_clock(device)
                    built.hf(input_ids=ids_t, use_cache=True, logits_to_keep=1)
                    elapsed = device_clock(device) - start
                if i:
                    samples.append(elapsed)
                progress.step(f"prefill hf_eager {n} tokens")
            hf.append(samples)
    columns = {"tandem": _simple_column(tandem, s.prompt_lengths)}
    columns["hf_eager"] = _simple_column(hf, s.prompt_lengths) if built.hf is not None else unavailable("skipped (--skip-hf)")
    return {"prompt_tokens": list(s.prompt_lengths), "columns": columns}


def bench_vision(built: Built, s: BenchSettings, progress: Progress) -> dict:
    engine, device, dtype = built.engine, s.torch_device, s.torch_dtype
    tandem, hf, preprocess, first_token, resized, patches, tokens = [], [], [], [], [], [], []
    one_token = forced_greedy(1)
    for size in s.image_sizes:
        image = bench_image(size, s.seed + size)
        pre, enc = [], []
        for i in range(1 + s.repeats):
            start = engine.now()
            inputs = preprocess_images([image], engine.image_config, device, dtype)
            mid = engine.now()
            with torch.inference_mode(), use_backend(s.kernel_backend):  # the tower alone, as the engine runs it
                engine.model.visual(inputs.pixel_values, [tuple(g) for g in inputs.grid_thw.tolist()])
            end = engine.now()
            if i:
                pre.append(mid - start)
                enc.append(end - mid)
            progress.step(f"vision tandem {size}px")
        preprocess.append(pre)
        tandem.append(enc)
        question = image_question(image)
        first = []
        for i in range(1 + s.repeats):
            start = engine.now()
            engine.generate(question, one_token)
            if i:
                first.append(engine.now() - start)
            progress.step(f"first token tandem {size}px")
        first_token.append(first)
        _, h, w = inputs.grid_thw[0].tolist()
        resized.append([h * engine.image_config.patch_size, w * engine.image_config.patch_size])
        patches.append(h * w)
        tokens.append(inputs.tokens_per_image[0])
        if built.hf is not None:
            grid = inputs.grid_thw.to(device)
            samples = []
            for i in range(1 + s.repeats):
                with torch.no_grad():
                    start = device_clock(device)
                    built.hf.model.visual(inputs.pixel_values, grid_thw=grid)
                    elapsed = device_clock(device) - start
                if i:
                    samples.append(elapsed)
                progress.step(f"vision hf_eager {size}px")
            hf.append(samples)
    columns = {"tandem": {**_simple_column(tandem), "preprocess_ms": [to_ms(median(x)) for x in preprocess],
                          "first_token_ms": [to_ms(median(x)) for x in first_token],
                          "first_token_samples_ms": [[to_ms(v) for v in x] for x in first_token]}}
    columns["hf_eager"] = _simple_column(hf) if built.hf is not None else unavailable("skipped (--skip-hf)")
    return {"sizes": list(s.image_sizes), "resized": resized, "patches": patches, "image_tokens": tokens,
            "columns": columns}


def _simple_column(samples: list[list[float]], tokens: tuple[int, ...] | None = None) -> dict:
    column = {"ms": [to_ms(median(x)) for x in samples], "samples_ms": [[1000 * v for v in x] for x in samples]}
    if tokens is not None:
        column["tokens_per_s"] = [n / (ms / 1000) for n, ms in zip(tokens, column["ms"])]
    return column
