"""Load a Qwen3-VL checkpoint folder (model.safetensors or a sharded index) straight to a device and dtype.

Everything is checked from the safetensors headers before any tensor data is read: every parameter must be
present once with its exact shape, and nothing unexpected may be left over. A bad checkpoint raises
CheckpointError naming the file and tensor; a model is returned whole or not at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from tandem.models.config import ModelConfig, load_config
from tandem.models.errors import CheckpointError
from tandem.models.qwen3_vl import PackedLinear, Qwen3VL

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_BAR_BYTES = 1 << 30
_FINITE_CHECK_ELEMENTS = 1 << 26  # elements per isfinite() call: a 64 MiB mask at most


IN_MEMORY = Path("<state dict>")  # the "file" of tensors handed over in memory, as error messages name it


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor that fills rows [offset, offset + rows) of a model parameter."""

    name: str
    file: Path
    offset: int
    shape: tuple[int, ...]


class _Reader:
    """Reads checkpoint tensors: from safetensors files (kept open), or from an in-memory state dict."""

    def __init__(self, device: torch.device, state_dict: dict[str, torch.Tensor] | None = None):
        self.device = device
        self.state_dict = state_dict
        self.handles: dict[Path, object] = {}

    def read(self, name: str, file: Path) -> torch.Tensor:
        if file == IN_MEMORY:
            return self.state_dict[name].to(self.device)
        try:
            if file not in self.handles:
                self.handles[file] = safe_open(file, framework="pt", device=str(self.device))
            return self.handles[file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: could not read tensor {name} ({e})") from e


def load_model(checkpoint_dir: str | Path, device: torch.device | str, dtype: torch.dtype,
               config: ModelConfig | None = None) -> Qwen3VL:
    """The checkpoint's model, every weight on `device` in `dtype`. `config` saves re-reading config.json."""
    checkpoint_dir = Path(checkpoint_dir)
    config = config or load_config(checkpoint_dir)
    headers = _read_headers(_weight_files(checkpoint_dir))
    return _build(config, headers, _Reader(torch.device(device)), dtype)


def load_model_from_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor],
                               device: torch.device | str, dtype: torch.dtype) -> Qwen3VL:
    """The same model from tensors already in memory and named as in a checkpoint (a transformers
    Qwen3VLForConditionalGeneration's state_dict()), checked the same way: benchmarks and tests compare the two
    implementations on identical weights without writing gigabytes of files."""
    headers = {name: (IN_MEMORY, tuple(t.shape), _dtype(str(t.dtype), IN_MEMORY, name)) for name, t in state_dict.items()}
    return _build(config, headers, _Reader(torch.device(device), state_dict), dtype)


def _build(config: ModelConfig, headers: dict, reader: _Reader, dtype: torch.dtype) -> Qwen3VL:
    with torch.device("meta"):
        model = Qwen3VL(config)
    plan = _plan(model, headers)
    _load(model, plan, reader, dtype)
    if config.tie_word_embeddings and "lm_head.weight" in headers:
        path = headers["lm_head.weight"][0]
        _check_tied_copy(model, reader.read("lm_head.weight", path).to(dtype), path)
    return model.to(reader.device).eval().requires_grad_(False)


def weight_bytes(checkpoint_dir: str | Path, dtype: torch.dtype) -> int:
    """The device memory the checkpoint's weights take in `dtype`, from the safetensors headers alone."""
    headers = _read_headers(_weight_files(Path(checkpoint_dir)))
    return sum(math.prod(shape) for _, shape, _ in headers.values()) * dtype.itemsize


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    index, single = checkpoint_dir / INDEX_FILE, checkpoint_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({checkpoint_dir / name for name in weight_map.values()})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from e
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is not in {checkpoint_dir}")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"{checkpoint_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """Every tensor's file, shape and dtype, from the headers alone. A tensor found in two files is an error."""
    found: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    info = (path, tuple(sl.get_shape()), _dtype(sl.get_dtype(), path, name))
                    if name in found:
                        raise CheckpointError(f"{path}: tensor {name} is also in {found[name][0].name}")
                    found[name] = info
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    return found


def _dtype(name: str, path: Path, tensor: str) -> torch.dtype:
    """A float dtype from its safetensors name (F32...) or torch name (torch.float32...)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    dtypes |= {str(d): d for d in dtypes.values()}
    if name not in dtypes:
        raise CheckpointError(f"{path}: tensor {tensor} has dtype {name}; only float weights are supported")
    return dtypes[name]


def _sources(model: Qwen3VL, param_name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint tensor name, expected shape) of each tensor that fills one model parameter, in stacking order."""
    prefix = "" if param_name.startswith("lm_head.") else "model."
    module_name, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, PackedLinear):
        parent = module_name.rpartition(".")[0]
        return [(f"{prefix}{parent}.{part}.{leaf}", (rows, module.in_features)) for part, rows in module.parts.items()]
    return [(prefix + param_name, tuple(getattr(module, leaf).shape))]


def _plan(model: Qwen3VL, headers: dict) -> dict[str, list[Source]]:
    """Map every model parameter to its checkpoint tensors, checking presence and shapes; reject leftovers."""
    plan: dict[str, list[Source]] = {}
    missing = []
    for param_name, _ in model.named_parameters():
        offset, sources = 0, []
        for name, expected in _sources(model, param_name):
            if name not in headers:
                missing.append(name)
                continue
            path, shape, _ = headers[name]
            if shape != expected:
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {list(shape)}, expected {list(expected)} for this config"
                )
            sources.append(Source(name, path, offset, shape))
            offset += shape[0]
        plan[param_name] = sources
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    used = {s.name for sources in plan.values() for s in sources}
    # A tied checkpoint may still carry lm_head.weight; it is accepted only as an exact copy (checked after load).
    leftovers = sorted(set(headers) - used - ({"lm_head.weight"} if model.config.tie_word_embeddings else set()))
    if leftovers:
        path = headers[leftovers[0]][0]
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(leftovers[:5])} (not part of this Qwen3-VL config)")
    return plan


def _load(model: Qwen3VL, plan: dict[str, list[Source]], reader: _Reader, dtype: torch.dtype) -> None:
    total = sum(math.prod(s.shape) for sources in plan.values() for s in sources) * dtype.itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=total < PROGRESS_BAR_BYTES) as bar:
        for param_name, sources in plan.items():
            module_name, _, leaf = param_name.rpartition(".")
            module = model.get_submodule(module_name)
            tensor = torch.empty(module._parameters[leaf].shape, dtype=dtype, device=reader.device)
            for s in sources:
                part = tensor[s.offset : s.offset + s.shape[0]]
                part.copy_(reader.read(s.name, s.file))
                _check_finite(part, s, dtype)
                bar.update(math.prod(s.shape) * dtype.itemsize)
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def _check_finite(loaded: torch.Tensor, source: Source, dtype: torch.dtype) -> None:
    """Refuse a tensor holding NaN or Inf (a corrupt file, or values beyond `dtype`'s range): the model would load
    and then generate garbage. Checked on the target device, in slices, so the check's mask stays small."""
    flat = loaded.view(-1)
    for chunk in flat.split(_FINITE_CHECK_ELEMENTS):
        if not bool(torch.isfinite(chunk).all()):
            bad = int((~torch.isfinite(flat)).sum())
            raise CheckpointError(
                f"{source.file}: tensor {source.name} holds {bad} non-finite value(s) (NaN or Inf) once read as "
                f"{str(dtype).removeprefix('torch.')}; the checkpoint is corrupt, or its values overflow that dtype")


def _check_tied_copy(model: Qwen3VL, lm_head: torch.Tensor, path: Path) -> None:
    if lm_head.shape != model.lm_head_weight.shape or not torch.equal(lm_head, model.lm_head_weight):
        raise CheckpointError(
            f"{path}: tensor lm_head.weight differs from the embedding, but config.json says tie_word_embeddings=true"
        )
