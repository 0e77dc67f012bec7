"""Image files built by hand for tests/test_image.py: PNGs Pillow cannot write (16-bit RGB, grey + alpha, RGBA) and
huge ones that stay small on disk. A PNG is a signature and CRC-checked chunks (RFC 2083): IHDR, zlib-compressed
IDAT rows each led by a filter byte (0: none), IEND."""

from __future__ import annotations

import struct
import zlib

import numpy as np

_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type: grey, grey + alpha, RGB, RGBA


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(height: int, width: int, bit_depth: int, channels: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, _COLOR_TYPES[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def png_bytes(samples: np.ndarray) -> bytes:
    """A PNG of uint8 or uint16 samples shaped (H, W) or (H, W, C), C = 1, 2, 3 or 4; 16-bit is stored big-endian."""
    bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}[samples.dtype]
    rows = samples.reshape(samples.shape[0], samples.shape[1], -1).astype(samples.dtype.newbyteorder(">"))
    height, width, channels = rows.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    idat = png_chunk(b"IDAT", zlib.compress(raw))
    return png_header(height, width, bit_depth, channels) + idat + png_chunk(b"IEND", b"")


def blank_png(height: int, width: int) -> bytes:
    """A black 8-bit grey PNG of any size: the rows are compressed one at a time, so a 10000x10000 image takes
    ~100 KB and no 100 MB buffer."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_header(height, width, 8, 1) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
