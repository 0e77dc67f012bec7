"""A Hugging Face model id where a folder is expected: resolved through the hub's cache, offline here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tandem.models.errors import CheckpointError
from tandem.models.hub import resolve_checkpoint
from tandem.runtime import Engine, SamplingParams, Tandem

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache: Path, model_id: str, checkpoint: Path) -> Path:
    """Lay a checkpoint out as huggingface_hub's cache does: blobs under a snapshot of a commit that refs/main names."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(monkeypatch, tmp_path, tiny_2b) -> Path:
    """An offline hub cache holding tandem-test/tiny-2b (huggingface_hub reads its settings at import: patch them)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = fill_hub_cache(cache, "tandem-test/tiny-2b", tiny_2b)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_model_id_resolves_to_its_cached_snapshot(offline_hub, tiny_2b):
    assert resolve_checkpoint("tandem-test/tiny-2b") == offline_hub
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    by_id = Engine.from_pretrained("tandem-test/tiny-2b", device="cpu", kv_cache_tokens=512).generate("Hi", greedy)
    by_folder = Engine.from_pretrained(tiny_2b, device="cpu", kv_cache_tokens=512).generate("Hi", greedy)
    assert by_id.token_ids == by_folder.token_ids
    pair = Tandem.from_pretrained("tandem-test/tiny-2b", tiny_2b, device="cpu", kv_cache_tokens=1024)
    assert pair.engines["large"].model.config == pair.engines["small"].model.config


def test_an_uncached_id_offline_is_one_clear_error(offline_hub):
    with pytest.raises(CheckpointError, match=r"Qwen/Qwen3-VL-8B-Instruct: not a local folder, not in the Hugging "
                                              r"Face cache .*could not be downloaded \(HF_HUB_OFFLINE is set\)"):
        Engine.from_pretrained("Qwen/Qwen3-VL-8B-Instruct", device="cpu")


def test_a_local_folder_wins_and_other_names_are_refused(tmp_path, monkeypatch, tiny_2b):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    shutil.copytree(tiny_2b, tmp_path / "owner" / "model")
    assert resolve_checkpoint("owner/model") == Path("owner/model")  # a folder spelled like an id is a folder
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: is a file; expected a checkpoint folder"):
        resolve_checkpoint("weights.safetensors")
    with pytest.raises(CheckpointError, match=r"\./missing: no such checkpoint folder"):
        resolve_checkpoint("./missing")
    with pytest.raises(CheckpointError, match=r"a/b/c: no such checkpoint folder"):
        resolve_checkpoint("a/b/c")
