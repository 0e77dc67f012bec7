"""Which implementation an op runs: by device, TANDEM_KERNEL_BACKEND, and the use_backend override."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import backend as d


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("TANDEM_KERNEL_BACKEND", raising=False)


def test_auto_runs_the_reference_on_the_cpu():
    assert d.implementation(torch.device("cpu")) == "torch"


def test_auto_runs_triton_or_flash_on_cuda(monkeypatch):
    assert d.implementation(torch.device("cuda")) == "triton"
    monkeypatch.setattr(d, "flash_attn_available", lambda: True)
    assert d.implementation(torch.device("cuda"), has_flash=True) == "flash"
    assert d.implementation(torch.device("cuda"), has_flash=False) == "triton"


def test_environment_and_override(monkeypatch):
    monkeypatch.setenv("TANDEM_KERNEL_BACKEND", "torch")
    assert d.implementation(torch.device("cuda")) == "torch"
    with d.use_backend("triton"):
        assert d.implementation(torch.device("cuda")) == "triton"
        with d.use_backend(None):
            assert d.implementation(torch.device("cuda")) == "torch"
    assert d.implementation(torch.device("cuda")) == "torch"


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with d.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        d.implementation(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with d.use_backend("triton"):
        assert d.implementation(torch.device("cpu")) == "triton"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="'cuda' is not one of auto, torch, triton"):
        d.use_backend("cuda").__enter__()
    monkeypatch.setenv("TANDEM_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast' is not one of"):
        d.implementation(torch.device("cpu"))


def test_dispatch_calls_the_chosen_implementation():
    op = d.dispatch(lambda x: x + 1, "operator:neg")  # stand-ins: the "reference" adds one, the "kernel" negates
    assert op(torch.ones(1)).item() == 2
    with d.use_backend("triton"):
        assert op(torch.ones(1)).item() == -1
