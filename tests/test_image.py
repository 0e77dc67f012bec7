"""tandem.models.image against its references: Pillow's BICUBIC resize (bit for bit) and transformers'
Qwen2VLImageProcessorPil with Qwen3-VL's settings (pixel_values within 1e-5, image_grid_thw identical)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from tandem.models.errors import CheckpointError, InputError
from tandem.models.image import (
    ImageInputs,
    ImageProcessorConfig,
    load_image,
    preprocess_images,
    resize_bicubic,
    smart_resize,
)
from tandem.models.tiny import PREPROCESSOR_CONFIG



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


def test_load_image_copies_numpy_memory() -> None:
    """A 1x1x3 array is already contiguous once moved to [3, 1, 1]; the tensor must still not alias it."""
    pixels = random_pixels((1, 1, 3), seed=2) | 1
    expected = to_chw(pixels.copy())
    loaded = load_image(pixels)
    pixels[:] = 0
    assert torch.equal(loaded, expected)


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
# Errors


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="not found") as error:
        preprocess_images([str(path)])
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_file_names_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="could not be decoded") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_truncated_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(random_pixels((64, 64, 3), seed=4)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="could not be decoded") as error:
        load_image(str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("array", "named"),
    [
        (np.zeros((5, 6, 3), dtype=np.float32), "float32"),
        (np.zeros((5, 6, 4), dtype=np.uint8), "(5, 6, 4)"),
        (np.zeros((2, 5, 6, 3), dtype=np.uint8), "(2, 5, 6, 3)"),
    ],
)
def test_bad_numpy_array_names_dtype_and_shape(array: np.ndarray, named: str) -> None:
    with pytest.raises(InputError) as error:
        preprocess_images([array])
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("tensor", "named"),
    [(torch.zeros(3, 5, 6), "torch.float32"), (torch.zeros(4, 5, 6, dtype=torch.uint8), "[4, 5, 6]")],
)
def test_bad_tensor_names_dtype_and_shape(tensor: torch.Tensor, named: str) -> None:
    with pytest.raises(InputError) as error:
        preprocess_images([tensor])
    assert named in str(error.value)


@pytest.mark.parametrize("image", [42, b"bytes", [[0, 0, 0]]])
def test_unsupported_type_is_named(image) -> None:
    with pytest.raises(InputError, match=f"unsupported image type {type(image).__name__}"):
        preprocess_images([image])
    with pytest.raises(InputError, match=f"unsupported image type {type(image).__name__}"):
        load_image(image)


@pytest.mark.parametrize(
    "image",
    [Image.new("RGB", (0, 5)), np.zeros((5, 0, 3), dtype=np.uint8), torch.zeros(3, 0, 0, dtype=torch.uint8)],
)
def test_zero_size_image_is_rejected(image) -> None:
    with pytest.raises(InputError, match="zero size"):
        preprocess_images([image])


def test_extreme_aspect_ratio_names_ratio_and_size() -> None:
    image = Image.fromarray(random_pixels((2, 501, 3), seed=6))
    with pytest.raises(InputError, match="aspect ratio 250.50") as error:
        preprocess_images([image])
    assert "2x501" in str(error.value)
    with pytest.raises(InputError, match="aspect ratio 201.00"):
        smart_resize(201, 1, 32, 65536, 16777216)
