"""tandem.models.image against its references: Pillow's BICUBIC resize (bit for bit) and transformers'
Qwen2VLImageProcessorPil with Qwen3-VL's settings (pixel_values within 1e-5, image_grid_thw identical); the loader
(tandem.models.image_load) against the source pixels, numpy arithmetic, transformers' load_image and smart_resize."""

from __future__ import annotations

import base64
import json
import re
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import load_image as reference_load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from tandem.models.errors import CheckpointError, InputError
from tandem.models.image import (
    MAX_ASPECT_RATIO,
    ImageInputs,
    ImageProcessorConfig,
    image_size,
    image_tokens,
    load_image,
    preprocess_images,
    resize_bicubic,
    smart_resize,
)
from tandem.models.tiny import PREPROCESSOR_CONFIG

from image_files import blank_png, png_bytes  # tests/image_files.py: PNGs written by hand


@pytest.fixture(scope="module")
def reference() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )


def random_pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def pillow_resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.array(Image.fromarray(array).resize((width, height), Image.BICUBIC))


def assert_matches_reference(actual: ImageInputs, expected) -> None:
    assert torch.equal(actual.grid_thw, expected["image_grid_thw"])
    assert actual.pixel_values.shape == expected["pixel_values"].shape
    assert actual.pixel_values.dtype == torch.float32
    assert (actual.pixel_values - expected["pixel_values"]).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------------------------
# resize_bicubic: bit-exact Pillow


RESIZE_CASES = [
    ((37, 53), (301, 419)),  # upscale both
    ((517, 389), (120, 77)),  # downscale both
    ((150, 40), (60, 200)),  # height down, width up: Pillow 13 runs the vertical pass first
    ((60, 200), (150, 40)),  # height up, width down
    ((400, 300), (100, 290)),  # height shrinks far more than width: vertical first
    ((400, 300), (330, 290)),  # both shrink, width's shrink dominates: horizontal first
    ((40, 60), (1, 41)),  # just past Pillow's pass-order threshold (39 > 2 * 19)
    ((40, 60), (2, 41)),  # exactly on it (38 == 2 * 19): horizontal first
    ((4000, 64), (256, 48)),  # ratio 15.6: 65-tap kernel
    ((48, 4000), (32, 256)),
    ((1, 300), (40, 2)),  # one pixel high
    ((300, 1), (7, 5)),  # one pixel wide
    ((1, 1), (64, 64)),
    ((123, 77), (123, 160)),  # width only
    ((123, 77), (31, 77)),  # height only
]


@pytest.mark.parametrize(("source", "target"), RESIZE_CASES)
def test_resize_bicubic_is_bit_exact_with_pillow(source: tuple[int, int], target: tuple[int, int]) -> None:
    pixels = random_pixels((*source, 3), seed=source[0] * 7919 + source[1])
    actual = resize_bicubic(to_chw(pixels), *target)
    assert actual.dtype == torch.uint8
    assert torch.equal(actual, to_chw(pillow_resize(pixels, *target)))


def test_resize_bicubic_is_bit_exact_on_random_sizes() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(60):
        height, width, out_height, out_width = (int(v) for v in rng.integers(1, 260, 4))
        pixels = random_pixels((height, width, 3), seed=int(rng.integers(1 << 30)))
        actual = resize_bicubic(to_chw(pixels), out_height, out_width)
        expected = to_chw(pillow_resize(pixels, out_height, out_width))
        assert torch.equal(actual, expected), f"{height}x{width} -> {out_height}x{out_width}"


def test_resize_bicubic_same_size_is_identity() -> None:
    image = to_chw(random_pixels((20, 30, 3), seed=0))
    assert torch.equal(resize_bicubic(image, 20, 30), image)


# --------------------------------------------------------------------------------------------------------------
# preprocess_images against Qwen2VLImageProcessorPil


def test_smart_resize_matches_reference() -> None:
    rng = np.random.default_rng(99)
    sizes = [(1, 1), (7, 3), (32, 32), (48, 80), (4200, 4100), (1, 200), (20, 1500)]
    sizes += [(int(h), int(h * r) or 1) for h, r in zip(rng.integers(1, 5000, 300), rng.uniform(0.01, 100, 300))]
    for height, width in sizes:
        expected = reference_smart_resize(height, width, factor=32, min_pixels=65536, max_pixels=16777216)
        assert smart_resize(height, width, 32, 65536, 16777216) == expected, (height, width)


PREPROCESS_SIZES = [
    (1, 1),  # tiny: upscaled to the 65536-pixel floor, as the reference does
    (7, 3),
    (20, 1500),  # extreme aspect ratios
    (1500, 20),
    (1, 200),  # aspect ratio exactly 200 is still accepted
    (480, 640),
    (333, 517),
    (1000, 30),
    (4200, 4100),  # above the 16777216-pixel cap: scaled down
]


@pytest.mark.parametrize(("height", "width"), PREPROCESS_SIZES)
def test_preprocess_matches_reference(reference, height: int, width: int) -> None:
    image = Image.fromarray(random_pixels((height, width, 3), seed=height * 10007 + width))
    assert_matches_reference(preprocess_images([image]), reference(images=[image], return_tensors="pt"))


def _mode_image(mode: str) -> Image.Image:
    rgba = random_pixels((45, 70, 4), seed=len(mode))
    rgba[:10, :10, 3] = 0  # a fully transparent corner, which the reference turns white
    if mode == "P":  # a palette image whose index 3 is transparent
        image = Image.fromarray(rgba[..., :3]).quantize(16)
        image.info["transparency"] = 3
        return image
    return Image.fromarray(rgba, "RGBA").convert(mode)


def _composites_alpha(reference: Qwen2VLImageProcessorPil) -> bool:
    """Whether this transformers turns transparent pixels white. Older releases (5.17, the GPU image's, for one)
    dropped alpha with a plain convert("RGB"); Tandem follows the current reference, which composites."""
    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    return np.asarray(reference.convert_to_rgb(clear)).ravel().tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK"])
def test_preprocess_matches_reference_for_pil_modes(reference, mode: str) -> None:
    if mode in ("RGBA", "LA", "P") and not _composites_alpha(reference):
        pytest.skip("this transformers converts alpha without compositing onto white (the older reference)")
    image = _mode_image(mode)
    assert image.mode == mode
    assert_matches_reference(preprocess_images([image]), reference(images=[image], return_tensors="pt"))


def test_transparent_pixels_become_white() -> None:
    """The reference composites alpha onto white; a plain .convert("RGB") would keep the hidden colour."""
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[0, 0, 3] = 0
    pixels[1:, :, 3] = 255
    loaded = load_image(Image.fromarray(pixels, "RGBA"))
    assert loaded[:, 0, 0].tolist() == [255, 255, 255]
    assert loaded[:, 3, 3].tolist() == [200, 0, 0]


def test_several_images_concatenate_in_order(reference) -> None:
    images = [Image.fromarray(random_pixels((h, w, 3), seed=h + w)) for h, w in [(300, 200), (64, 900), (250, 250)]]
    actual = preprocess_images(images)
    assert_matches_reference(actual, reference(images=images, return_tensors="pt"))
    singles = [preprocess_images([image]) for image in images]
    assert torch.equal(actual.pixel_values, torch.cat([single.pixel_values for single in singles]))
    assert actual.tokens_per_image == [int(g[1] * g[2]) // 4 for g in actual.grid_thw]
    assert actual.tokens_per_image == [single.tokens_per_image[0] for single in singles]


def test_file_path_matches_reference(reference, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(random_pixels((90, 140, 4), seed=5), "RGBA").save(path)
    expected = reference(images=[str(path)], return_tensors="pt")
    assert_matches_reference(preprocess_images([str(path)]), expected)
    assert_matches_reference(preprocess_images([path]), expected)


def test_numpy_and_tensor_inputs_equal_pil_inputs() -> None:
    rgb = random_pixels((50, 70, 3), seed=11)
    grey = rgb[..., 0].copy()
    from_pil = preprocess_images([Image.fromarray(rgb), Image.fromarray(grey, "L")])
    from_arrays = preprocess_images([rgb, grey])
    from_tensors = preprocess_images([to_chw(rgb), load_image(grey)])
    assert torch.equal(from_arrays.pixel_values, from_pil.pixel_values)
    assert torch.equal(from_tensors.pixel_values, from_pil.pixel_values)
    assert torch.equal(from_arrays.grid_thw, from_pil.grid_thw)


def test_output_dtype_is_a_cast_of_float32() -> None:
    image = random_pixels((40, 50, 3), seed=3)
    full = preprocess_images([image])
    half = preprocess_images([image], dtype=torch.bfloat16)
    assert half.pixel_values.dtype == torch.bfloat16
    assert torch.equal(half.pixel_values, full.pixel_values.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_bit_for_bit() -> None:
    images = [random_pixels((h, w, 3), seed=h) for h, w in [(7, 3), (517, 389), (1500, 20), (2100, 1700)]]
    cpu = preprocess_images(images)
    cuda = preprocess_images(images, device="cuda")
    assert cuda.pixel_values.device.type == "cuda"
    assert torch.equal(cuda.pixel_values.cpu(), cpu.pixel_values)
    assert torch.equal(cuda.grid_thw, cpu.grid_thw)


def test_no_images_gives_empty_inputs() -> None:
    inputs = preprocess_images([], dtype=torch.float16)
    assert inputs.pixel_values.shape == (0, 3 * 2 * 16 * 16)
    assert inputs.pixel_values.dtype == torch.float16
    assert inputs.grid_thw.shape == (0, 3)
    assert inputs.grid_thw.dtype == torch.int64
    assert inputs.tokens_per_image == []


# --------------------------------------------------------------------------------------------------------------
# ImageProcessorConfig.from_checkpoint


def write_config(folder: Path, content: str) -> Path:
    path = folder / "preprocessor_config.json"
    path.write_text(content)
    return path


def test_config_defaults_without_file(tmp_path: Path) -> None:
    assert ImageProcessorConfig.from_checkpoint(tmp_path) == ImageProcessorConfig()


def test_config_reads_qwen3_vl_file(tmp_path: Path) -> None:
    content = {**PREPROCESSOR_CONFIG, "patch_size": 14, "image_mean": [0.1, 0.2, 0.3]}
    write_config(tmp_path, json.dumps(content))
    config = ImageProcessorConfig.from_checkpoint(str(tmp_path))
    assert config == ImageProcessorConfig(patch_size=14, image_mean=(0.1, 0.2, 0.3))


def test_config_top_level_pixel_limits_override_size(tmp_path: Path) -> None:
    write_config(tmp_path, json.dumps({**PREPROCESSOR_CONFIG, "min_pixels": 3136, "max_pixels": 12845056}))
    config = ImageProcessorConfig.from_checkpoint(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (3136, 12845056)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[16, 2, 2]",
        '{"patch_size": "16"}',
        '{"merge_size": 0}',
        '{"image_mean": [0.5, 0.5]}',
        '{"image_std": [0.5, 0, 0.5]}',
        '{"size": 65536}',
        '{"resample": 2}',
        '{"rescale_factor": 0.5}',
    ],
)
def test_config_malformed_file_names_it(tmp_path: Path, content: str) -> None:
    path = write_config(tmp_path, content)
    with pytest.raises(CheckpointError, match="preprocessor_config.json") as error:
        ImageProcessorConfig.from_checkpoint(tmp_path)
    assert str(path) in str(error.value)



# --------------------------------------------------------------------------------------------------------------
# load_image: every source gives the same pixels


def png_file(folder: Path, pixels: np.ndarray, name: str = "image.png") -> Path:
    path = folder / name
    Image.fromarray(pixels).save(path)
    return path


def data_url(encoded: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(encoded).decode("ascii")


def test_every_source_of_one_rgb_image_loads_the_same_pixels(tmp_path: Path) -> None:
    rgb = random_pixels((23, 41, 3), seed=21)
    path = png_file(tmp_path, rgb)
    encoded = path.read_bytes()
    wrapped = base64.encodebytes(encoded).decode("ascii")  # 76-column lines, as mail and many tools write base64
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    padded = np.zeros((30, 50, 4), dtype=np.uint8)
    padded[2:25, 3:44, :3] = rgb
    sources = {
        "str path": str(path),
        "Path": path,
        "data URL": data_url(encoded),
        "data URL, upper case, line breaks": "DATA:image/PNG;BASE64," + wrapped,
        "bytes": encoded,
        "bytearray": bytearray(encoded),
        "memoryview": memoryview(encoded),
        "PIL": Image.fromarray(rgb),
        "numpy": rgb,
        "numpy BGR->RGB view (negative stride)": bgr[..., ::-1],
        "numpy slice (non-contiguous)": padded[2:25, 3:44, :3],
        "numpy Fortran order": np.asfortranarray(rgb),
        "numpy read-only": np.frombuffer(rgb.tobytes(), dtype=np.uint8).reshape(rgb.shape),
        "torch CHW uint8": to_chw(rgb),
        "torch CHW view": torch.from_numpy(rgb).permute(2, 0, 1),
        "torch CHW float in [0, 1]": to_chw(rgb).double() / 255,
        "torch requires_grad": (to_chw(rgb).float() / 255).requires_grad_(),
    }
    for name, source in sources.items():
        loaded = load_image(source)
        assert loaded.dtype == torch.uint8 and loaded.device.type == "cpu", name
        assert torch.equal(loaded, to_chw(rgb)), name


def test_grey_sources_repeat_to_rgb() -> None:
    grey = random_pixels((9, 13), seed=22)
    expected = to_chw(np.repeat(grey[:, :, None], 3, axis=2))
    for source in [grey, grey[:, :, None], torch.from_numpy(grey), torch.from_numpy(grey)[None], Image.fromarray(grey)]:
        assert torch.equal(load_image(source), expected)


def test_bool_sources_are_black_and_white() -> None:
    mask = random_pixels((6, 7), seed=23) > 127
    expected = to_chw(np.repeat(np.where(mask, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2))
    assert torch.equal(load_image(mask), expected)
    assert torch.equal(load_image(torch.from_numpy(mask)), expected)
    assert torch.equal(load_image(Image.fromarray(mask)), expected)  # PIL mode "1"


def test_alpha_arrays_composite_onto_white_as_the_reference(reference) -> None:
    rgba = random_pixels((45, 70, 4), seed=24)
    rgba[:10, :10, 3] = 0
    la = rgba[..., [0, 3]]
    assert torch.equal(load_image(torch.from_numpy(rgba).permute(2, 0, 1)), load_image(rgba))
    assert torch.equal(load_image(torch.from_numpy(la).permute(2, 0, 1)), load_image(la))
    if not _composites_alpha(reference):
        pytest.skip("this transformers neither composites alpha onto white nor takes 4-channel arrays (5.17)")
    assert_matches_reference(preprocess_images([rgba]), reference(images=[rgba], return_tensors="pt"))
    expected = reference(images=[Image.fromarray(la, "LA")], return_tensors="pt")
    assert_matches_reference(preprocess_images([la]), expected)


def test_file_sources_match_transformers_load_image(tmp_path: Path) -> None:
    """Files are EXIF-rotated and converted as transformers' load_image does (alpha dropped, not composited)."""
    rgba = random_pixels((30, 50, 4), seed=25)
    rgba[:5, :5, 3] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    jpeg = tmp_path / "rotated.jpg"
    Image.fromarray(rgba[..., :3]).save(jpeg, exif=exif.tobytes())
    for path in [png_file(tmp_path, rgba), jpeg]:
        expected = to_chw(np.array(reference_load_image(str(path))))
        assert torch.equal(load_image(path), expected)
        assert torch.equal(load_image(data_url(path.read_bytes())), expected)
    assert load_image(jpeg).shape == (3, 50, 30)


def test_load_image_copies_numpy_and_tensor_memory() -> None:
    """A 1x1x3 array is already contiguous once moved to [3, 1, 1]; the tensor must still not alias it."""
    pixels = random_pixels((1, 1, 3), seed=2) | 1
    expected = to_chw(pixels.copy())
    loaded = [load_image(pixels), load_image(torch.from_numpy(pixels).permute(2, 0, 1))]
    pixels[:] = 0
    for tensor in loaded:
        assert torch.equal(tensor, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_load_to_the_cpu() -> None:
    rgb = random_pixels((11, 17, 3), seed=26)
    for tensor in [to_chw(rgb).cuda(), (to_chw(rgb).float() / 255).cuda().half()]:
        loaded = load_image(tensor)
        assert loaded.device.type == "cpu"
        assert torch.equal(loaded, to_chw(rgb))
    assert image_size(to_chw(rgb).cuda()) == (11, 17)


# --------------------------------------------------------------------------------------------------------------
# High bit depth and float images: rescaled as a viewer shows them, never clipped

GRADIENT_16 = np.tile(np.linspace(0, 65535, 300).round().astype(np.uint16), (4, 1))
"""0..65535 across the width: a clipping convert("RGB") makes it almost all white."""
EXPECTED_16 = np.array([round(Fraction(int(v) * 255, 65535)) for v in GRADIENT_16[0]])
GRADIENT_FLOAT = np.tile(np.linspace(0.0, 1.0, 300), (4, 1))


def _16_bit_sources(folder: Path) -> dict[str, object]:
    grey, opaque = GRADIENT_16, np.full_like(GRADIENT_16, 65535)
    pillow_png, tiff = folder / "grey16.png", folder / "grey16.tif"
    Image.fromarray(grey).save(pillow_png)  # Pillow writes mode I;16 as a 16-bit grey PNG
    Image.fromarray(grey).save(tiff)
    size = grey.shape[::-1]
    return {
        "16-bit grey PNG file (Pillow)": pillow_png,
        "16-bit grey TIFF file": tiff,
        "16-bit grey PNG bytes (by hand)": png_bytes(grey),
        "PIL I;16": Image.frombytes("I;16", size, grey.astype("<u2").tobytes()),
        "PIL I;16L": Image.frombytes("I;16L", size, grey.astype("<u2").tobytes()),
        "PIL I;16B": Image.frombytes("I;16B", size, grey.astype(">u2").tobytes()),
        "PIL I;16N": Image.frombytes("I;16N", size, grey.astype("=u2").tobytes()),
        "PIL I": Image.fromarray(grey.astype(np.int32)),
        "numpy uint16": grey,
        "numpy big-endian uint16": grey.astype(">u2"),
        "numpy uint16 RGBA, opaque": np.stack([grey, grey, grey, opaque], axis=-1),
        "torch uint16": torch.from_numpy(grey.astype(np.int32)).to(torch.uint16),
    }


def test_16_bit_gradients_rescale_exactly(tmp_path: Path) -> None:
    for name, source in _16_bit_sources(tmp_path).items():
        loaded = load_image(source).numpy().astype(np.int64)
        assert (loaded == EXPECTED_16).all(), name
        assert loaded.min() == 0 and loaded.max() == 255, name


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16_bit_color_pngs_keep_their_gradient(channels: int) -> None:
    """Pillow decodes 16-bit grey + alpha, RGB and RGBA PNGs itself, keeping each sample's high byte: within one
    level of the exact rescale (alpha opaque, so no compositing changes the values)."""
    planes = [GRADIENT_16, GRADIENT_16[:, ::-1], GRADIENT_16][: channels if channels != 2 else 1]
    if channels in (2, 4):
        planes.append(np.full_like(GRADIENT_16, 65535))
    loaded = load_image(png_bytes(np.stack(planes, axis=-1))).numpy().astype(np.int64)
    assert np.abs(loaded[0] - EXPECTED_16).max() <= 1
    if channels != 2:
        assert np.abs(loaded[1] - EXPECTED_16[::-1]).max() <= 1
    assert loaded.min() == 0 and loaded.max() == 255


def _float_sources(folder: Path) -> dict[str, tuple[object, np.ndarray]]:
    """Each source with the float64 values it really holds (float16 and bfloat16 round the gradient)."""
    tiff = folder / "float.tif"
    Image.fromarray(GRADIENT_FLOAT.astype(np.float32)).save(tiff)
    as_float32 = GRADIENT_FLOAT.astype(np.float32).astype(np.float64)
    bf16 = torch.from_numpy(GRADIENT_FLOAT).bfloat16()
    return {
        "PIL F": (Image.fromarray(GRADIENT_FLOAT.astype(np.float32)), as_float32),
        "mode F TIFF file": (tiff, as_float32),
        "numpy float64": (GRADIENT_FLOAT, GRADIENT_FLOAT),
        "numpy float32": (GRADIENT_FLOAT.astype(np.float32), as_float32),
        "numpy float16": (GRADIENT_FLOAT.astype(np.float16), GRADIENT_FLOAT.astype(np.float16).astype(np.float64)),
        "torch float32 (H, W)": (torch.from_numpy(GRADIENT_FLOAT).float(), as_float32),
        "torch float64 (3, H, W)": (torch.from_numpy(GRADIENT_FLOAT).expand(3, -1, -1), GRADIENT_FLOAT),
        "torch bfloat16": (bf16, bf16.double().numpy()),
    }


def test_float_gradients_rescale_by_255(tmp_path: Path) -> None:
    for name, (source, values) in _float_sources(tmp_path).items():
        expected = np.array([[round(float(v) * 255) for v in row] for row in values])
        loaded = load_image(source).numpy().astype(np.int64)
        assert (np.abs(loaded - expected) <= 1).all(), name  # Python's round vs numpy's rint on float32 products
        assert loaded.min() == 0 and loaded.max() == 255, name


@pytest.mark.parametrize(
    ("image", "named"),
    [
        (Image.fromarray(np.array([[-5, 0], [7, 70000]], dtype=np.int32)), r"mode I has values in \[-5, 70000\]"),
        (Image.fromarray(np.array([[0, 1], [1, 70000]], dtype=np.int32)), r"mode I has values in \[0, 70000\]"),
        (Image.fromarray(np.array([[0, 0.5], [1, 3]], dtype=np.float32)), r"mode F has values in \[0, 3\]"),
        (np.array([[0, 0.5], [1, -0.25]]), r"float64 array of shape \(2, 2\) has values in \[-0.25, 1\]"),
        (np.array([[0, 255.0]], dtype=np.float32), r"has values in \[0, 255\]"),
        (np.array([[0, np.nan], [np.inf, 1]], dtype=np.float32), "has 2 NaN or infinite values"),
        (torch.tensor([[[0.0, 2.0]]] * 3), r"torch.float32 tensor of shape \[3, 1, 2\] has values in \[0, 2\]"),
        (torch.full((1, 2, 2), float("nan"), dtype=torch.float16), "has 4 NaN or infinite values"),
        (np.zeros((4, 4, 3), dtype=np.int64), "int64 array .* pixel type not supported"),
        (np.zeros((4, 4), dtype=np.int16), "int16 array .* pixel type not supported"),
        (np.zeros((4, 4), dtype=np.uint32), "uint32 array .* pixel type not supported"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), r"torch.int32 tensor .* pixel type not supported"),
    ],
)
def test_values_without_an_8_bit_view_are_refused(image, named: str) -> None:
    with pytest.raises(InputError, match=rf"^image 1: .*{named}"):
        preprocess_images([random_pixels((4, 4, 3), seed=0), image])


# --------------------------------------------------------------------------------------------------------------
# Animated images: refused, one frame at a time is fine


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), color) for color in ("red", "lime", "blue")]


@pytest.mark.parametrize("file_format", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animated_images_are_refused_naming_the_frames(tmp_path: Path, file_format: str) -> None:
    path = tmp_path / f"anim.{file_format.lower()}"
    first, *rest = _frames()
    first.save(path, file_format, save_all=True, append_images=rest)
    for source in [path, path.read_bytes(), Image.open(path)]:
        with pytest.raises(InputError, match=f"{file_format} image has 3 frames: Tandem reads still images") as error:
            load_image(source, index=2)
        assert str(error.value).startswith("image 2")
        with pytest.raises(InputError, match="3 frames"):
            image_size(source)
    with Image.open(path) as animation:
        animation.seek(1)
        assert load_image(animation.copy())[:, 0, 0].tolist() == [0, 255, 0]


def test_one_frame_gif_and_mpo_primary_image_are_read(tmp_path: Path) -> None:
    first, second, _ = _frames()
    gif = tmp_path / "still.gif"
    first.save(gif)
    assert load_image(gif)[:, 0, 0].tolist() == [255, 0, 0]
    mpo = tmp_path / "stereo.mpo"  # MPO's extra frames are views, not an animation (e.g. Ultra HDR gain maps)
    first.save(mpo, "MPO", save_all=True, append_images=[second])
    assert load_image(mpo).shape == (3, 30, 40)
    assert image_size(mpo) == (30, 40)


# --------------------------------------------------------------------------------------------------------------
# image_size and image_tokens: the token count before any pixel is decoded


def test_image_size_of_every_source_is_the_loaded_size(tmp_path: Path) -> None:
    rgb = random_pixels((19, 33, 3), seed=27)
    exif = Image.Exif()
    exif[0x0112] = 8
    jpeg = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(jpeg, exif=exif.tobytes())
    png = png_file(tmp_path, rgb)
    sources = [png, str(jpeg), jpeg.read_bytes(), data_url(png.read_bytes()), Image.fromarray(rgb), rgb,
               rgb[..., 0], to_chw(rgb), to_chw(rgb)[0], GRADIENT_16, torch.from_numpy(GRADIENT_FLOAT)]
    for source in sources:
        assert image_size(source) == tuple(load_image(source).shape[1:])
    assert image_size(jpeg) == (33, 19)


def _count_decodes(monkeypatch) -> list:
    """Every pixel decode in Pillow goes through Image._getdecoder: record the calls."""
    calls = []
    make_decoder = Image._getdecoder

    def counting(*args, **kwargs):
        calls.append(args)
        return make_decoder(*args, **kwargs)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    return calls


def test_image_size_reads_only_the_header(tmp_path: Path, monkeypatch) -> None:
    """10000x10000 (above Pillow's decompression-bomb warning): the size and token count come from the header,
    with no decode and no warning. (Measured: ~4 ms, against ~22 s to decode and resize it.)"""
    path = tmp_path / "huge.png"
    path.write_bytes(blank_png(10000, 10000))
    decodes = _count_decodes(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(path) == (10000, 10000)
        assert image_size(data_url(path.read_bytes())) == (10000, 10000)
    assert decodes == []
    expected = reference_smart_resize(10000, 10000, factor=32, min_pixels=65536, max_pixels=16777216)
    assert image_tokens(10000, 10000) == (expected[0] // 32) * (expected[1] // 32) == 16384
    small = png_file(tmp_path, random_pixels((8, 8, 3), seed=28), "small.png")
    load_image(small)
    assert decodes, "the counter must see a real decode"


def test_decompression_bomb_limit_gives_our_error(tmp_path: Path, monkeypatch) -> None:
    """Pillow's hard limit (2 x MAX_IMAGE_PIXELS) becomes our InputError naming the file and the pixel count;
    below it, its warning is silenced and the image loads."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    legit, bomb = tmp_path / "legit.png", tmp_path / "bomb.png"
    legit.write_bytes(blank_png(40, 40))  # 1600 pixels: Pillow warns
    bomb.write_bytes(blank_png(50, 50))  # 2500 pixels: Pillow refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(legit).shape == (3, 40, 40)
        for call in (load_image, image_size):
            with pytest.raises(InputError, match=r"too large to decode: .*2500 pixels.*MAX_IMAGE_PIXELS") as error:
                call(bomb, 0)
            assert str(error.value).startswith(f"image 0 ({bomb})")


SMALL_CAP = ImageProcessorConfig(patch_size=14, min_pixels=3136, max_pixels=200704)
"""Qwen2-VL-like settings with a low pixel cap: the scale-down branch without a 16-megapixel resize."""

TOKEN_CASES = [
    (1, 1), (1, 2), (2, 1), (7, 3), (31, 33), (32, 32), (48, 80), (63, 65), (255, 257), (333, 517), (1000, 30),
    (1, 200), (200, 1), (33, 6600), (6600, 33), (17, 3399),  # aspect ratio exactly 200 and just under
    (600, 800), (1500, 1001),  # above SMALL_CAP's cap: scaled down
]


@pytest.mark.parametrize(("height", "width"), TOKEN_CASES)
@pytest.mark.parametrize("config", [ImageProcessorConfig(), SMALL_CAP], ids=["qwen3-vl", "small-cap"])
def test_image_tokens_is_what_preprocessing_produces(height: int, width: int, config: ImageProcessorConfig) -> None:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)  # the content does not change the grid
    assert image_tokens(height, width, config) == preprocess_images([pixels], config).tokens_per_image[0]


def test_image_tokens_matches_the_reference_arithmetic() -> None:
    rng = np.random.default_rng(7)
    sizes = [(10000, 10000), (100000, 500), (500, 100000), (1, 199), (29, 5799), (65536, 65536), (3, 3)]
    sizes += [(int(h), max(1, int(h * r))) for h, r in zip(rng.integers(1, 20000, 400), rng.uniform(0.005, 200, 400))]
    config = ImageProcessorConfig(patch_size=14, min_pixels=3136, max_pixels=12845056)
    for height, width in sizes:
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            continue
        for factor, cfg in [(32, ImageProcessorConfig()), (28, config)]:
            h, w = reference_smart_resize(height, width, factor=factor, min_pixels=cfg.min_pixels,
                                          max_pixels=cfg.max_pixels)
            assert image_tokens(height, width, cfg) == (h // factor) * (w // factor), (height, width, factor)


@pytest.mark.parametrize(
    ("height", "width", "named"),
    [(0, 5, r"zero size: 0x5"), (5, 0, "zero size: 5x0"), (300, 1, r"aspect ratio 300.00 exceeds 200 \(size 300x1"),
     (1, 201, "aspect ratio 201.00")],
)
def test_image_tokens_refusals_name_the_image(height: int, width: int, named: str) -> None:
    with pytest.raises(InputError, match=rf"^image 3: {named}"):
        image_tokens(height, width, index=3)


# --------------------------------------------------------------------------------------------------------------
# Errors: every refusal is an InputError naming the image (index, file) and the values at fault


def _truncated_png(folder: Path) -> Path:
    path = folder / "cut.png"
    Image.fromarray(random_pixels((64, 64, 3), seed=4)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def _bad_crc_png(folder: Path) -> Path:
    path = folder / "crc.png"
    good = png_bytes(random_pixels((8, 8, 3), seed=5))
    path.write_bytes(good[:29] + bytes([good[29] ^ 0xFF]) + good[30:])  # IHDR's CRC: bytes 29..32
    return path


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


BAD_IMAGES = [
    # (id, factory(tmp_path) -> the bad image, message pattern after "image 1 (name): ")
    ("None", lambda d: None, "unsupported image type NoneType"),
    ("int", lambda d: 42, "unsupported image type int"),
    ("float", lambda d: 1.5, "unsupported image type float"),
    ("dict", lambda d: {"url": "x.png"}, "unsupported image type dict"),
    ("list", lambda d: [[0, 0, 0]], "unsupported image type list"),
    ("empty string", lambda d: "", "empty path"),
    ("blank string", lambda d: "   ", "empty path"),
    ("http URL", lambda d: "http://example.com/cat.jpg", "http URLs are not fetched"),
    ("https URL", lambda d: "https://example.com/cat.jpg", "https URLs are not fetched"),
    ("file URL", lambda d: "file:///tmp/cat.jpg", "file URLs are not fetched"),
    ("missing file", lambda d: str(d / "nope.jpg"), "file not found"),
    ("missing Path", lambda d: d / "nope.jpg", "file not found"),
    ("base64 without data: prefix", lambda d: "iVBORw0KGgo" * 40, "file not found .*data:image/...;base64, prefix"),
    ("NUL in path", lambda d: "cat\0.png", "NUL character"),
    ("directory", lambda d: d, "is a directory"),
    ("0-byte file", lambda d: _write(d, "empty.png", b""), r"empty file \(0 bytes\)"),
    ("text file", lambda d: _write(d, "notes.txt", b"hello"), "could not be decoded: not an image format"),
    ("PNG signature, then zeros", lambda d: _write(d, "z.png", b"\x89PNG\r\n\x1a\n" + bytes(40)), "not an image"),
    ("truncated PNG", _truncated_png, "could not be decoded: image file is truncated"),
    ("PNG with a bad CRC", _bad_crc_png, "could not be decoded"),
    ("empty bytes", lambda d: b"", r"empty image data \(0 bytes\)"),
    ("junk bytes", lambda d: b"definitely not an image", "could not be decoded"),
    ("data URL, bad base64", lambda d: "data:image/png;base64,@@@@", "invalid base64"),
    ("data URL, empty", lambda d: "data:image/png;base64,", r"empty image data \(0 bytes\)"),
    ("data URL, not base64", lambda d: "data:image/png,%89PNG", "not base64-encoded"),
    ("data URL, text type", lambda d: "data:text/plain;base64,aGVsbG8=", "data URL of type 'text/plain', not an image"),
    ("data URL, no comma", lambda d: "data:image/png;base64", "malformed data URL"),
    ("data URL, junk image", lambda d: data_url(b"not a png"), "could not be decoded"),
    ("animated GIF", lambda d: _animated_gif(d), "GIF image has 3 frames"),
    ("PIL zero width", lambda d: Image.new("RGB", (0, 5)), r"zero size: 5x0"),
    ("PIL mode La", lambda d: Image.new("La", (4, 4)), "could not be converted from mode La to RGB"),
    ("PIL mode I negative", lambda d: Image.fromarray(np.full((4, 4), -3, np.int32)), r"mode I has values in \[-3, -3"),
    ("PIL mode F above 1", lambda d: Image.fromarray(np.full((4, 4), 2.5, np.float32)), r"mode F has values in \[2.5"),
    ("PIL closed file", lambda d: _closed_image(d), "could not be decoded"),
    ("numpy zero height", lambda d: np.zeros((0, 5, 3), np.uint8), "zero size: 0x5"),
    ("numpy 1-D", lambda d: np.zeros(5, np.uint8), r"shape \(5,\): expected \(H, W\) or \(H, W, C\)"),
    ("numpy 0-D", lambda d: np.array(7, np.uint8), r"shape \(\): expected"),
    ("numpy batch", lambda d: np.zeros((1, 4, 4, 3), np.uint8), r"shape \(1, 4, 4, 3\).*a batch\?"),
    ("numpy channels first", lambda d: np.zeros((3, 32, 32), np.uint8), r"got C = 32 \(channels first\?"),
    ("numpy 5 channels", lambda d: np.zeros((4, 4, 5), np.uint8), "got C = 5"),
    ("numpy object", lambda d: np.array([[None, None]]), "object array .*pixel type not supported"),
    ("numpy complex", lambda d: np.zeros((2, 2), complex), "complex128 array .*pixel type not supported"),
    ("numpy int64", lambda d: np.zeros((4, 4, 3), np.int64), "int64 array .*pixel type not supported"),
    ("numpy float out of range", lambda d: np.full((4, 4, 3), 255.0), r"has values in \[255, 255\]"),
    ("numpy NaN", lambda d: np.full((4, 4), np.nan), "16 NaN or infinite values"),
    ("torch channels last", lambda d: torch.zeros(32, 32, 3, dtype=torch.uint8), r"got C = 32 \(channels last\?"),
    ("torch batch", lambda d: torch.zeros(1, 3, 4, 4), r"\[1, 3, 4, 4\].*a batch\?"),
    ("torch int64", lambda d: torch.zeros(3, 4, 4, dtype=torch.int64), r"torch.int64 tensor .*to\(torch.uint8\)"),
    ("torch float below 0", lambda d: -torch.ones(3, 4, 4), r"has values in \[-1, -1\]"),
    ("torch zero width", lambda d: torch.zeros(3, 4, 0, dtype=torch.uint8), "zero size: 4x0"),
    ("torch sparse", lambda d: torch.zeros(4, 4).to_sparse(), "layout torch.sparse_coo not supported"),
    ("torch meta", lambda d: torch.zeros(3, 4, 4, device="meta"), "on the meta device: it holds no pixels"),
    ("torch meta uint8 RGB", lambda d: torch.zeros(3, 4, 4, device="meta", dtype=torch.uint8), "meta device"),
    ("aspect ratio 300x1", lambda d: np.zeros((300, 1, 3), np.uint8), r"aspect ratio 300.00 exceeds 200"),
    ("aspect ratio 2x501", lambda d: Image.new("RGB", (501, 2)), r"aspect ratio 250.50 exceeds 200 \(size 2x501"),
]


def _animated_gif(folder: Path) -> Path:
    path = folder / "anim.gif"
    first, *rest = _frames()
    first.save(path, save_all=True, append_images=rest)
    return path


def _closed_image(folder: Path) -> Image.Image:
    with Image.open(png_file(folder, random_pixels((4, 4, 3), seed=6), "closed.png")) as image:
        pass
    return image


@pytest.mark.parametrize(("make", "pattern"), [case[1:] for case in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_is_refused_naming_it(tmp_path: Path, make, pattern: str) -> None:
    """The bad image is the second of the request: the message must name image 1 (and its file, if any)."""
    bad = make(tmp_path)
    with pytest.raises(InputError) as error:
        preprocess_images([random_pixels((8, 8, 3), seed=1), bad])
    message = str(error.value)
    assert message.startswith("image 1"), message
    assert re.search(pattern, message), message
    if isinstance(bad, Path) or (isinstance(bad, str) and 0 < len(bad) < 100 and not bad.startswith("data:")):
        assert str(bad).replace("\0", "\\x00") in message


def test_refusals_without_an_index_still_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match=rf"^image \({re.escape(str(path))}\): file not found$"):
        load_image(path)
    with pytest.raises(InputError, match=r"^image: numpy float64 array"):
        load_image(np.full((2, 2), 9.0))


def test_image_size_refuses_what_it_can_judge_without_pixels(tmp_path: Path) -> None:
    """Every BAD_IMAGES case whose fault is visible without the pixels is refused by image_size too."""
    needs_pixels = ("truncated", "mode La", "mode I", "mode F", "closed", "out of range", "NaN", "below 0", "aspect")
    for name, make, pattern in BAD_IMAGES:
        if any(word in name for word in needs_pixels):
            continue
        with pytest.raises(InputError) as error:
            image_size(make(tmp_path), 1)
        assert str(error.value).startswith("image 1") and re.search(pattern, str(error.value)), name
