"""tandem.kernels.env: the one module that reads the environment."""

from __future__ import annotations

import pytest

from tandem.kernels import env
from tandem.runtime import Engine


@pytest.mark.parametrize("value,expected", [(None, True), ("", True), ("1", True), ("0", False), ("off", False),
                                            ("TRUE", True)])
def test_cuda_graphs_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("TANDEM_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("TANDEM_CUDA_GRAPHS", value)
    assert env.cuda_graphs() is expected


def test_a_bad_switch_names_the_variable(monkeypatch):
    monkeypatch.setenv("TANDEM_CUDA_GRAPHS", "maybe")
    with pytest.raises(ValueError, match=r"TANDEM_CUDA_GRAPHS='maybe' is not a switch: use 1 or 0"):
        env.cuda_graphs()


def test_engines_take_the_cuda_graphs_setting_unless_told(monkeypatch, tiny_2b):
    monkeypatch.setenv("TANDEM_CUDA_GRAPHS", "0")
    assert Engine.from_pretrained(tiny_2b, device="cpu", kv_cache_tokens=256).runner.cuda_graphs is False
    assert Engine.from_pretrained(tiny_2b, device="cpu", kv_cache_tokens=256, cuda_graphs=True).runner.cuda_graphs


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert env.cache_dir() == tmp_path / "tandem"
