"""The one image loader: every image source Tandem accepts becomes a uint8 RGB tensor [3, H, W] on the CPU.

Sources (the README's table is this list):
- a file path (str or os.PathLike), a `data:image/...;base64,...` URL (decoded here), or the bytes of an encoded
  image (bytes, bytearray, memoryview): opened with Pillow, EXIF-rotated and converted as transformers'
  `load_image` does (`convert("RGB")`: alpha is dropped). Nothing is fetched: a URL (http, https, ...) is refused.
- a PIL image of any mode Pillow can convert: converted as the processor's `convert_to_rgb` does (alpha and a
  transparency key are composited onto white).
- a numpy array, channels last like PIL and OpenCV: (H, W) or (H, W, C); any strides (views such as
  `bgr[..., ::-1]` are copied).
- a torch tensor, channels first like torchvision: (H, W) or (C, H, W); any device (copied to the CPU).
  For arrays and tensors C is 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA); alpha is composited onto white.

Pixel values: uint8 as they are; bool -> 0 / 255; 16-bit (numpy/torch uint16, PIL modes I;16*, and mode I with
values in 0..65535, which is how Pillow loads some 16-bit files) -> round(v * 255 / 65535); float (PIL mode F,
float arrays and tensors) within [0, 1] -> round(v * 255). Every other case is refused (other integer types, mode I
outside 0..65535, floats outside [0, 1] or not finite): those values have no standard 8-bit view, and clipping them,
as `convert("RGB")` does, would silently give an all-white or all-black image. 16-bit RGB(A) PNGs are decoded by
Pillow itself, which keeps each sample's high byte (v >> 8, within one level of the rounding above).

An image with more than one frame (animated GIF, APNG or WebP, multi-page TIFF) is refused: Tandem reads still
images, and serving frame 0 without a word would answer about a picture the caller may not have meant. Formats
whose first frame is the picture itself (MPO's primary image, e.g. an Ultra HDR JPEG; PSD's composite) are read.

Size: `image_size` gives (height, width) from a file's header or an array's shape, without decoding pixels, so the
token count (`image.image_tokens`) is known before the work. Pillow's decompression-bomb warning is silenced (such an
image is legitimate; its token count is what matters); its hard limit, 2 x PIL.Image.MAX_IMAGE_PIXELS (178,956,970
pixels by default), is refused as an InputError.

Every refusal is an InputError whose message starts with `image_label(...)`: the image's index in the request and
its file name where it has one.
"""

from __future__ import annotations

import base64
import hashlib
import binascii
import contextlib
import io
import os
import re
import warnings
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from tandem.models.errors import InputError

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor]

_CHANNELS = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}

_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
"""PIL modes whose values do not fit 8 bits: `convert("RGB")` clips them, so they are rescaled here (a transparency
key on such an image, which has no alpha band, is not applied)."""

_STILL_FORMATS_WITH_FRAMES = ("MPO", "PSD")
"""Formats whose extra frames are not an animation: frame 0 is the picture (MPO's primary image; PSD's composite,
the others being its layers)."""

_TORCH_PIXEL_TYPES = {
    torch.uint8: torch.uint8, torch.bool: torch.bool, torch.uint16: torch.uint16,
    torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
    torch.float64: torch.float64,
}
"""The dtypes a tensor image may have, and the dtype its values are read in (numpy has no bfloat16)."""

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_MAX_NAME = 120
"""Longer strings are shortened in messages (a base64 blob passed as a path would otherwise fill the screen)."""


def load_image(image: ImageLike, index: int | None = None) -> torch.Tensor:
    """Load any accepted image source as a uint8 RGB tensor [3, H, W] on the CPU that owns its memory.

    `index` (the image's position among the request's images) is only used to name the image in errors.
    """
    try:
        if isinstance(image, Image.Image):
            return _pil_to_rgb(image, composite=True)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return _array_to_rgb(_pixels_hwc(image), _describe_array(image))
        with _open(image) as opened:
            _check_still(opened)
            with _pillow_errors():
                opened.load()
                ImageOps.exif_transpose(opened, in_place=True)
            return _pil_to_rgb(opened, composite=False)
    except InputError as exc:
        raise _named(exc, image, index) from exc.__cause__


def image_size(image: ImageLike, index: int | None = None) -> tuple[int, int]:
    """(height, width) of an image as `load_image` would return it, without decoding any pixels.

    A file, data URL or bytes is opened lazily (Pillow reads the header; EXIF orientation is applied to the size);
    arrays, tensors and PIL images give their shape. Refuses, as `load_image` would, anything it can judge without
    the pixels (type, path, URL, frames, shape, dtype, zero size, Pillow's decompression-bomb limit).
    """
    try:
        if isinstance(image, Image.Image):
            _check_still(image)
            return _checked_size(image.height, image.width)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            height, width, _ = _layout(image)
            _pixel_type(image)
            return _checked_size(height, width)
        with _open(image) as opened:
            _check_still(opened)
            with _pillow_errors():
                # The base getexif reads only what the header gave: PngImageFile's override decodes the whole image
                # to look for an eXIf chunk after the pixels (rare; the size is then reported unrotated).
                orientation = Image.Image.getexif(opened).get(0x0112, 1)
            width, height = opened.size
            if orientation in (5, 6, 7, 8):  # a quarter turn: exif_transpose swaps the sides
                width, height = height, width
            return _checked_size(height, width)
    except InputError as exc:
        raise _named(exc, image, index) from exc.__cause__


def image_label(image: object, index: int | None = None) -> str:
    """How errors name an image: "image 2 (photos/cat.png)", "image 0 (1234 bytes)", "image 1", "image"."""
    label = "image" if index is None else f"image {index}"
    name = _source_name(image)
    return f"{label} ({name})" if name else label


def _named(exc: InputError, image: object, index: int | None) -> InputError:
    return InputError(f"{image_label(image, index)}: {exc}")


def _source_name(image: object) -> str:
    if isinstance(image, str):
        if image[:5].lower() == "data:":
            return image.partition(",")[0][:_MAX_NAME] + ",..."
        name = image if image.isprintable() else image.encode("unicode_escape").decode("ascii")
        return name if len(name) <= _MAX_NAME else f"{name[:_MAX_NAME]}... ({len(image)} characters)"
    if isinstance(image, os.PathLike):
        return _source_name(os.fsdecode(os.fspath(image)))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"{memoryview(image).nbytes} bytes"
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or ""
    return ""


# ---------------------------------------------------------------------------------------------------------------
# Encoded images: files, data URLs, bytes


def _open(source: object) -> Image.Image:
    """Open an encoded image lazily: Pillow reads the header, no pixels. Use it as a context manager (closes it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        encoded = io.BytesIO(_non_empty(bytes(source)))
    elif isinstance(source, str) and source[:5].lower() == "data:":
        encoded = io.BytesIO(_non_empty(_data_url_bytes(source)))
    elif isinstance(source, (str, os.PathLike)):
        encoded = _checked_path(source)
    else:
        raise InputError(
            f"unsupported image type {type(source).__name__}: expected a file path, a data:image/...;base64 URL, "
            "the bytes of an image file, a PIL image, a numpy array or a torch tensor"
        )
    with _pillow_errors():
        return Image.open(encoded)


def _checked_path(source: str | os.PathLike) -> str:
    path = os.fsdecode(os.fspath(source))
    if not path.strip():
        raise InputError("empty path: expected a file path or a data:image/...;base64 URL")
    url = _URL.match(path)
    if url:
        raise InputError(
            f"{url.group(1)} URLs are not fetched: the engine reads local images only; download it and pass the "
            "file path or its bytes, or pass a data:image/...;base64 URL, a PIL image or an array"
        )
    if "\0" in path:
        raise InputError("the path contains a NUL character")
    if os.path.isdir(path):
        raise InputError("is a directory, not an image file")
    if not os.path.exists(path):
        hint = " (base64 image data needs a data:image/...;base64, prefix)" if len(path) > 255 else ""
        raise InputError(f"file not found{hint}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError("empty file (0 bytes)")
    return path


def _data_url_bytes(url: str) -> bytes:
    """The payload of a `data:image/<type>;base64,<data>` URL (RFC 2397); other data URLs are refused."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise InputError("malformed data URL: no ',' before the data")
    media_type, *params = header[5:].split(";")
    if not media_type.strip().lower().startswith("image/"):
        raise InputError(f"data URL of type {media_type.strip() or 'text/plain'!r}, not an image")
    if "base64" not in (param.strip().lower() for param in params):
        raise InputError("data URL is not base64-encoded: only data:image/...;base64, URLs are read")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as exc:
        raise InputError(f"data URL holds invalid base64 ({exc})") from None


def _non_empty(data: bytes) -> bytes:
    if not data:
        raise InputError("empty image data (0 bytes)")
    return data


@contextlib.contextmanager
def _pillow_errors(failure: str = "could not be decoded") -> Iterator[None]:
    """Run Pillow calls with its failures turned into InputError.

    Pillow's plugins raise many types on malformed data (OSError, SyntaxError, struct.error, IndexError, ...), so
    every Exception is caught here, around Pillow calls only. Its decompression-bomb warning is silenced: an image
    below its hard limit is legitimate, and its token count is checked by the caller (image_size, image_tokens).
    (warnings.catch_warnings is process-wide state; the worst a concurrent thread can see is one warning hidden.)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"too large to decode: {exc} Downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS "
            f"(now {Image.MAX_IMAGE_PIXELS}) if the file is trusted"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise InputError(f"{failure}: not an image format Pillow recognizes") from exc
    except OSError as exc:
        if exc.errno is not None:  # the file system's error (permissions, ...), not the decoder's
            raise InputError(f"cannot be read: {exc.strerror or exc}") from exc
        raise InputError(f"{failure}: {exc}") from exc
    except Exception as exc:
        raise InputError(f"{failure}: {type(exc).__name__}: {exc}") from exc


def _check_still(image: Image.Image) -> None:
    with _pillow_errors():
        frames = getattr(image, "n_frames", 1)  # GIF counts its frames by reading through them
    if frames > 1 and image.format not in _STILL_FORMATS_WITH_FRAMES:
        raise InputError(
            f"{image.format} image has {frames} frames: Tandem reads still images; pass one frame "
            "(e.g. img.seek(i); img.copy())"
        )


def _checked_size(height: int, width: int) -> tuple[int, int]:
    if height <= 0 or width <= 0:
        raise InputError(f"zero size: {height}x{width} (height x width)")
    return height, width


# ---------------------------------------------------------------------------------------------------------------
# PIL images


def _pil_to_rgb(image: Image.Image, composite: bool) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W]. 8-bit modes convert exactly as the reference does (`composite`: the
    processor's convert_to_rgb for in-memory images, else load_image's plain convert); wide modes are rescaled."""
    _check_still(image)
    _checked_size(image.height, image.width)
    with _pillow_errors():
        image.load()  # a lazily opened image decodes here
    if image.mode in _WIDE_MODES:
        return _array_to_rgb(_wide_mode_pixels(image), f"PIL image of mode {image.mode}")
    with _pillow_errors(f"could not be converted from mode {image.mode} to RGB"):
        rgb = _flatten_to_rgb(image) if composite else image.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparent pixels become white rather than their stored colour."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_mode_pixels(image: Image.Image) -> np.ndarray:
    """The values of an I;16*, I or F image as an (H, W) array that `_to_uint8` rescales."""
    values = np.asarray(image)
    if image.mode != "I":
        return values  # I;16* -> uint16 (in its byte order), F -> float32
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise InputError(
            f"PIL image of mode I has values in [{low}, {high}]: mode I is read as 16-bit (0..65535, as Pillow "
            "loads 16-bit files), and other ranges have no standard 8-bit view; convert it to mode L or RGB yourself"
        )
    return values.astype(np.uint16)


# ---------------------------------------------------------------------------------------------------------------
# Arrays and tensors


def _describe_array(image: np.ndarray | torch.Tensor) -> str:
    if isinstance(image, torch.Tensor):
        return f"{image.dtype} tensor of shape {list(image.shape)}"
    return f"numpy {image.dtype} array of shape {image.shape}"


def _layout(image: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    """(height, width, channels) under the layout rules: numpy channels last, torch channels first."""
    shape = tuple(image.shape)
    channels_first = isinstance(image, torch.Tensor)
    expected = "(H, W) or (C, H, W)" if channels_first else "(H, W) or (H, W, C)"
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) != 3:
        hint = "; a batch? pass one image, e.g. x[0]" if len(shape) == 4 else ""
        raise InputError(f"{_describe_array(image)}: expected {expected} with C in 1..4{hint}")
    height, width, channels = (shape[1], shape[2], shape[0]) if channels_first else shape
    if channels not in _CHANNELS:
        if channels_first:
            hint = " (channels last? pass tensor.permute(2, 0, 1); torch images are channels first)"
        else:
            hint = " (channels first? pass array.transpose(1, 2, 0); numpy images are channels last)"
        hint = hint if (shape[2] if channels_first else shape[0]) in _CHANNELS else ""
        raise InputError(
            f"{_describe_array(image)}: expected {expected} with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or "
            f"4 (RGBA), got C = {channels}{hint}"
        )
    return height, width, channels


def _pixel_type(image: np.ndarray | torch.Tensor) -> None:
    """Refuse dtypes without a defined 8-bit view before looking at any value."""
    if isinstance(image, torch.Tensor):
        if image.layout != torch.strided:
            raise InputError(f"{_describe_array(image)}: layout {image.layout} not supported; pass a dense tensor")
        if image.is_meta:
            raise InputError(f"{_describe_array(image)} is on the meta device: it holds no pixels")
        supported, convert = image.dtype in _TORCH_PIXEL_TYPES, ".to(torch.uint8)"
    else:
        supported = image.dtype.kind in "bf" or (image.dtype.kind == "u" and image.dtype.itemsize <= 2)
        convert = ".astype(np.uint8)"
    if not supported:
        raise InputError(
            f"{_describe_array(image)}: pixel type not supported; use uint8 (0..255), uint16 (0..65535), bool, "
            f"or float in [0, 1] (other types have no fixed range: convert, e.g. with {convert})"
        )


def _pixels_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Check an array or tensor's layout and dtype; its values as a channels-last (H, W, C) numpy array."""
    height, width, channels = _layout(image)
    _pixel_type(image)
    _checked_size(height, width)
    if isinstance(image, np.ndarray):
        return np.asarray(image).reshape(height, width, channels)  # asarray: np.matrix cannot be 3-D
    try:
        cpu = image.detach().to("cpu", _TORCH_PIXEL_TYPES[image.dtype])
    except (RuntimeError, NotImplementedError) as exc:
        raise InputError(f"{_describe_array(image)} on {image.device} could not be copied to the CPU: {exc}") from exc
    return cpu.reshape(-1, height, width).permute(1, 2, 0).numpy()


def _array_to_rgb(pixels: np.ndarray, what: str) -> torch.Tensor:
    """(H, W) or (H, W, C) pixels of any accepted dtype -> uint8 [3, H, W] that owns its memory."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = _to_uint8(pixels, what)
    channels = pixels.shape[2]
    if channels == 1:
        pixels = np.broadcast_to(pixels, (*pixels.shape[:2], 3))
    elif channels in (2, 4):  # LA / RGBA: composite onto white exactly as a PIL image of that mode is
        pixels = np.asarray(_flatten_to_rgb(Image.fromarray(np.ascontiguousarray(pixels))))
    # np.array copies: the tensor must own its memory (the caller may reuse the array), and any strides work.
    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


def _to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    """Rescale to 8 bits as an image viewer shows the values; refuse what has no such view (never clip)."""
    kind, size = values.dtype.kind, values.dtype.itemsize
    if kind == "u" and size == 1:
        return values
    if kind == "b":
        return values.astype(np.uint8) * np.uint8(255)
    if kind == "u" and size == 2:
        # round(v * 255 / 65535) in integers; 65535 is odd, so v * 255 / 65535 is never exactly halfway.
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if kind == "f":
        values = values.astype(np.float32) if size < 4 else values
        finite = np.isfinite(values)
        if not finite.all():
            raise InputError(f"{what} has {int(values.size - finite.sum())} NaN or infinite values; "
                             "float images must lie within [0, 1]")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise InputError(f"{what} has values in [{low:.6g}, {high:.6g}]; float images must lie within [0, 1] "
                             "(divide 0..255 data by 255, or pass uint8)")
        return np.rint(values * values.dtype.type(255)).astype(np.uint8)
    raise InputError(f"{what}: pixel type {values.dtype} not supported")


def image_digest(image: torch.Tensor) -> str:
    """Content hash of a decoded uint8 [3, H, W] image (shape included: same bytes, other shape, other image)."""
    h = hashlib.sha256(str(tuple(image.shape)).encode())
    h.update(image.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
