"""Qwen3-VL image preprocessing in torch, on any device (loading, from any source, is image_load.py).

The output matches transformers' `Qwen2VLImageProcessorPil` (with Qwen3-VL's settings) to the bit: the resize
re-implements Pillow's 8-bit BICUBIC resampling (libImaging/Resample.c, including the installed Pillow's choice of
which pass runs first) in integer arithmetic, because `F.interpolate(mode="bicubic", antialias=True)` differs from
Pillow by 1-2 levels on about 1% of pixels, and the rescale/normalize step uses a 256-entry table built with the
reference's own float64-then-float32 arithmetic.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import PIL
import torch

from tandem.models.errors import CheckpointError, InputError
from tandem.models.image_load import ImageLike, image_digest, image_label, image_size, load_image

__all__ = [
    "ImageInputs", "ImageLike", "ImageProcessorConfig", "MAX_ASPECT_RATIO", "image_digest", "image_label", "image_size",
    "image_tokens", "load_image", "preprocess_images", "resize_bicubic", "smart_resize",
]

MAX_ASPECT_RATIO = 200
"""Qwen's smart_resize rejects images whose long side exceeds this multiple of the short side."""

_PRECISION_BITS = 32 - 8 - 2
"""Pillow's fixed-point precision for 8-bit resampling: 8 bits of pixel and 2 of headroom stay in a 32-bit int."""

_PILLOW_MAY_RESIZE_VERTICALLY_FIRST = int(PIL.__version__.split(".")[0]) >= 13
"""Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks much more than the
width; earlier versions always go horizontal first. The reference uses the installed Pillow, so we follow it."""

_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0

_RESCALE_FACTOR = 1 / 255

_REQUIRED_SETTINGS = {
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,  # PIL BICUBIC
}
"""preprocessor_config.json values this module implements; any other value would silently change the output."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing settings of a Qwen3-VL checkpoint (defaults are Qwen3-VL's)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        """Reject settings that would make the resize or patchify ill-defined (zero patches, division by zero)."""
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 3 and all(_is_number(v) for v in value)):
                raise ValueError(f"{name} must be a tuple of 3 numbers, got {value!r}")
        if 0 in self.image_std:
            raise ValueError(f"image_std must not contain 0, got {self.image_std!r}")

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this: one merge block of patches."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x frames x patch pixels."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` from a checkpoint folder; Qwen3-VL defaults where it is absent.

        Pixel limits come from `size.shortest_edge`/`size.longest_edge`, overridden by top-level `min_pixels`/
        `max_pixels` as the transformers processor does. Keys this module does not use are ignored.
        """
        path = Path(checkpoint_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(**_config_kwargs(raw))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed image preprocessor config {path}: {exc}") from exc


def _is_number(value: Any) -> bool:
    """True for int/float but not bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_kwargs(raw: Any) -> dict[str, Any]:
    """Map preprocessor_config.json keys onto ImageProcessorConfig fields; TypeError/ValueError on bad content."""
    if not isinstance(raw, dict):
        raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
    for key, required in _REQUIRED_SETTINGS.items():
        if raw.get(key) not in (None, required):
            raise ValueError(f"{key}={raw[key]!r} is not supported (only {required!r})")
    if not math.isclose(raw.get("rescale_factor", _RESCALE_FACTOR), _RESCALE_FACTOR, rel_tol=1e-9):
        raise ValueError(f"rescale_factor={raw['rescale_factor']!r} is not supported (only 1/255)")
    names = {f.name for f in fields(ImageProcessorConfig)}
    kwargs = {key: value for key, value in raw.items() if key in names and value is not None}
    size = raw.get("size") or {}
    if not isinstance(size, dict):
        raise TypeError(f"size must be an object, got {size!r}")
    kwargs.setdefault("min_pixels", size.get("shortest_edge", ImageProcessorConfig.min_pixels))
    kwargs.setdefault("max_pixels", size.get("longest_edge", ImageProcessorConfig.max_pixels))
    for key in ("image_mean", "image_std"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# Resizing


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    A line-for-line copy of transformers' smart_resize (Python's round-half-even included) so that the patch grid,
    and hence the number of image tokens, is identical. Tiny images are scaled up to reach min_pixels.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"zero size: {height}x{width} (height x width)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"aspect ratio {ratio:.2f} exceeds {MAX_ASPECT_RATIO} (size {height}x{width}, height x width); "
            "crop or pad it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(height: int, width: int, config: ImageProcessorConfig = ImageProcessorConfig(),
                 index: int | None = None) -> int:
    """The prompt tokens an image of this size takes (`image_size` gives the size without decoding the image).

    The same smart_resize as `preprocess_images`: one token per merge block of the resized image. InputError (naming
    image `index`) for a size it refuses: zero, or an aspect ratio beyond MAX_ASPECT_RATIO.
    """
    height, width = _target_size(height, width, config, None, index)
    return (height // config.factor) * (width // config.factor)


def _target_size(height: int, width: int, config: ImageProcessorConfig, image: object,
                 index: int | None) -> tuple[int, int]:
    """smart_resize with the checkpoint's settings, its refusals naming the image."""
    try:
        return smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    except InputError as exc:
        raise InputError(f"{image_label(image, index)}: {exc}") from None


def resize_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a uint8 [3, H, W] tensor bit-exactly as `PIL.Image.resize((width, height), BICUBIC)` does.

    Like Pillow: one pass per axis whose size changes, each rounded to uint8, in Pillow's order (see
    `_vertical_pass_first`). Returns `image` itself when the size is unchanged. Runs on the tensor's device.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise InputError(f"resize_bicubic takes a uint8 [3, H, W] tensor, got {image.dtype} {list(image.shape)}")
    if height <= 0 or width <= 0:
        raise InputError(f"resize target has zero size: {height}x{width} (height x width)")
    if _vertical_pass_first(image.shape[1], image.shape[2], height, width):
        return _resample_width(_resample_height(image, height), width)
    return _resample_height(_resample_width(image, width), height)


def _resample_height(image: torch.Tensor, height: int) -> torch.Tensor:
    """Pillow's vertical pass, skipped (as Pillow skips it) when the height does not change."""
    return image if height == image.shape[1] else _resample_rows(image, height)


def _resample_width(image: torch.Tensor, width: int) -> torch.Tensor:
    """Pillow's horizontal pass, done as a row pass on the transposed image: gathering whole rows is several
    times faster than gathering single elements along the last dim. Skipped when the width does not change."""
    if width == image.shape[2]:
        return image
    return _resample_rows(image.transpose(1, 2).contiguous(), width).transpose(1, 2).contiguous()


def _vertical_pass_first(in_height: int, in_width: int, height: int, width: int) -> bool:
    """Pillow 13's pass order: vertical first iff the height shrinks by more than twice the width's shrink.

    The order matters for bit-exactness because each pass rounds to uint8. Pillow's C source was not at hand; this
    rule was fitted to Pillow 13.0.0 and matched it on ~15,000 size pairs where the two orders give different pixels.
    """
    shrink_h, shrink_w = in_height - height, in_width - width
    return _PILLOW_MAY_RESIZE_VERTICALLY_FIRST and shrink_h > 0 and shrink_h > 2 * shrink_w


def _resample_rows(image: torch.Tensor, out_size: int) -> torch.Tensor:
    """One Pillow resampling pass over dim 1 of a uint8 [C, N, M] tensor: out = clip8((2**21 + sum(px * coef)) >> 22).

    Accumulates in int32, tap by tap in Pillow's order, like Pillow's C `int`: the partial sums are the same
    integers, so they match even where they would wrap. Looping over taps (rather than gathering a
    [C, out, taps, M] tensor) keeps memory at a few copies of the output.
    """
    index, coeffs = _bicubic_coefficients(image.shape[1], out_size)
    index, coeffs = index.to(image.device), coeffs.to(image.device).unsqueeze(-1)
    acc = torch.full(
        (image.shape[0], out_size, image.shape[2]), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=image.device
    )
    for tap in range(index.shape[1]):
        acc.addcmul_(image.index_select(1, index[:, tap]), coeffs[:, tap])
    return (acc >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _bicubic_filter(x: float) -> float:
    """Pillow's bicubic kernel (a = -0.5), with its exact operation order so the doubles round identically."""
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((_BICUBIC_A + 2.0) * x - (_BICUBIC_A + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * _BICUBIC_A
    return 0.0


@functools.lru_cache(maxsize=256)
def _bicubic_coefficients(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis, in host doubles.

    Returns CPU tensors (index int64, coeffs int32), both [out_size, taps]: the input positions each output reads
    and their fixed-point weights. Rows shorter than the widest are padded with weight 0 (reading position 0).
    Depends only on the two sizes, hence cached; callers must not modify the tensors.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    rows = [_coefficient_row((xx + 0.5) * scale, in_size, filterscale) for xx in range(out_size)]
    taps = max(len(weights) for _, weights in rows)
    index = [list(range(xmin, xmin + len(w))) + [0] * (taps - len(w)) for xmin, w in rows]
    coeffs = [[_fixed_point(k) for k in w] + [0] * (taps - len(w)) for _, w in rows]
    return torch.tensor(index, dtype=torch.int64), torch.tensor(coeffs, dtype=torch.int32)


def _coefficient_row(center: float, in_size: int, filterscale: float) -> tuple[int, list[float]]:
    """First input position and normalised weights for the output centred at `center` (C truncation via int())."""
    support = _BICUBIC_SUPPORT * filterscale
    ss = 1.0 / filterscale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size) - xmin
    weights = [_bicubic_filter((x + xmin - center + 0.5) * ss) for x in range(xmax)]
    total = 0.0
    for w in weights:  # sequential, as in C (Python's sum() may compensate)
        total += w
    if total != 0.0:
        weights = [w / total for w in weights]
    return xmin, weights


def _fixed_point(weight: float) -> int:
    """Round a weight to PRECISION_BITS fixed point the way Pillow does: +-0.5 then truncate toward zero."""
    scaled = weight * (1 << _PRECISION_BITS)
    return int(scaled - 0.5) if weight < 0 else int(scaled + 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class ImageInputs:
    """Vision-encoder inputs for a batch of images, concatenated in order."""

    pixel_values: torch.Tensor
    """[total_patches, 3 * temporal_patch_size * patch_size**2]; rows grouped by merge block, images in order."""
    grid_thw: torch.Tensor
    """[num_images, 3] int64 on the CPU: (1, height in patches, width in patches); Python code reads its values."""
    merge_size: int = 2
    """Side of the square of patches the vision merger turns into one token."""

    @property
    def tokens_per_image(self) -> list[int]:
        """Number of image placeholder tokens each image takes in the prompt."""
        return [h * w // self.merge_size**2 for _, h, w in self.grid_thw.tolist()]


def preprocess_images(
    images: list[ImageLike],
    config: ImageProcessorConfig = ImageProcessorConfig(),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageInputs:
    """Load, resize, normalize and patchify images as Qwen2VLImageProcessorPil does, computing on `device`.

    Each image may be anything `load_image` accepts; a uint8 [3, H, W] tensor (what load_image returns) is used
    as it is, on any device. It is moved to `device` as uint8 (the cheapest transfer), processed in float32 there,
    and cast to `dtype` at the end. Errors name the image by its index in `images`.
    """
    patches, grids = [], []
    table = _normalization_table(config).to(device)
    for index, image in enumerate(images):
        tensor = image if _is_loaded(image) else load_image(image, index)
        tensor = tensor.to(device)
        height, width = _target_size(tensor.shape[1], tensor.shape[2], config, image, index)
        resized = resize_bicubic(tensor, height, width)
        patches.append(_patchify(_normalize(resized, table), config))
        grids.append([1, height // config.patch_size, width // config.patch_size])
    if not patches:
        patches.append(torch.empty(0, config.patch_dim, device=device))
    return ImageInputs(
        pixel_values=torch.cat(patches).to(dtype),
        grid_thw=torch.tensor(grids, dtype=torch.int64).view(-1, 3),
        merge_size=config.merge_size,
    )


def _is_loaded(image: object) -> bool:
    """A uint8 RGB [3, H, W] tensor with data needs no loading: taken as is, it also stays on its device (e.g. CUDA)."""
    return (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3
            and image.shape[0] == 3 and image.layout == torch.strided and not image.is_meta)


def _normalization_table(config: ImageProcessorConfig) -> torch.Tensor:
    """[3, 256] float32: the normalized value of every uint8 level per channel, built on the host.

    Mirrors the reference arithmetic exactly: level * (1/255) in float64, cast to float32, then
    (x - mean) / std in float32, so a lookup reproduces its values bit for bit on any device.
    """
    levels = (torch.arange(256, dtype=torch.float64) * _RESCALE_FACTOR).to(torch.float32)
    mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1)
    return (levels - mean) / std


def _normalize(image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [3, H, W] by per-channel lookup in the normalization table."""
    offsets = torch.arange(3, device=image.device).view(3, 1, 1) * 256
    return torch.take(table, image.long() + offsets)


def _patchify(image: torch.Tensor, config: ImageProcessorConfig) -> torch.Tensor:
    """[3, H, W] -> [patches, patch_dim] in the reference's order: merge blocks row-major, then the patches in a
    block, each patch flattened as (channel, frame, row, col) with the single frame repeated temporal_patch_size times.
    """
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    channels, height, width = image.shape
    grid_h, grid_w = height // p, width // p
    blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], t, p, p)
    return frames.reshape(grid_h * grid_w, config.patch_dim)
