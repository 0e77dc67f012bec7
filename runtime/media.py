"""The server's images: an `image_url` resolved to its bytes, within the operator's limits, before any model work.

`data:` URLs (base64), `http(s)://` URLs fetched with a timeout and a byte limit, and `file://` URLs only under the
directory the operator allows (none by default). Every image's size is read from its header and held to a pixel
limit before the engine decodes it (once per request). A refusal is an InputError naming where the URL was.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tandem.models.errors import InputError

DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_IMAGE_BYTES = 20 << 20
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_IMAGES = 8  # per request
DEFAULT_MAX_REQUEST_BYTES = 64 << 20  # a request's whole body, its base64 images most of it: two at the byte limit


@dataclass(frozen=True)
class MediaLimits:
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES  # in one request
    allowed_local_path: Path | None = None  # file:// URLs are refused unless they lie under this directory


async def image_bytes(url: str, where: str, limits: MediaLimits) -> bytes:
    """The image at `url` (`where`: the request field it came from, for messages), checked against the limits."""
    if not isinstance(url, str) or not url:
        raise InputError(f"{where}: the image URL must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _from_data_url(url, where, limits)
    elif scheme in ("http", "https"):
        data = await _fetch(url, where, limits)
    elif scheme == "file":
        data = await asyncio.to_thread(_from_file, url, where, limits)
    else:
        raise InputError(f"{where}: unsupported image URL {_short(url)!r}: give a data: URL (base64), an http(s):// "
                         "URL, or a file:// URL under the server's --allowed-local-media-path")
    _check_pixels(data, where, limits)
    return data


def _from_data_url(url: str, where: str, limits: MediaLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InputError(f"{where}: a data URL must look like data:image/png;base64,<base64 bytes>")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise InputError(f"{where}: the image is larger than the server's limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}: the data URL's payload is not valid base64 ({e})") from None


async def _fetch(url: str, where: str, limits: MediaLimits) -> bytes:
    try:
        return await asyncio.wait_for(_get(url, where, limits), limits.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise InputError(f"{where}: fetching {_short(url)} took longer than {limits.fetch_timeout_s:g} s") from None
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - httpx.HTTPError, and what a malformed URL raises (InvalidURL, ...)
        raise InputError(f"{where}: fetching {_short(url)} failed ({type(e).__name__}: {e})") from None


async def _get(url: str, where: str, limits: MediaLimits) -> bytes:
    import httpx

    async with httpx.AsyncClient(follow_redirects=True, max_redirects=5) as client:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise InputError(f"{where}: fetching {_short(url)} returned HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise _too_large(where, limits)
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limits.max_bytes:
                    raise _too_large(where, limits)
            return bytes(data)


def _from_file(url: str, where: str, limits: MediaLimits) -> bytes:
    if limits.allowed_local_path is None:
        raise InputError(f"{where}: local files are off on this server (its operator can allow a directory with "
                         "--allowed-local-media-path)")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InputError(f"{where}: a file URL names no host: file:///path/to/image.png")
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    allowed = limits.allowed_local_path.resolve()
    if not path.is_relative_to(allowed):
        raise InputError(f"{where}: {path} is outside the directory this server allows ({allowed})")
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise _too_large(where, limits)
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read {path} ({e.strerror or e})") from None


def _check_pixels(data: bytes, where: str, limits: MediaLimits) -> None:
    """The size from the header alone (Pillow decodes lazily): a huge image is refused before it is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    if width * height > limits.max_pixels:
        raise InputError(f"{where}: the image is {width}x{height} = {width * height} pixels, more than the server's "
                         f"limit of {limits.max_pixels}")


def _too_large(where: str, limits: MediaLimits) -> InputError:
    return InputError(f"{where}: the image is larger than the server's limit of {limits.max_bytes} bytes")


def _short(url: str) -> str:
    return url if len(url) <= 100 else url[:97] + "..."
