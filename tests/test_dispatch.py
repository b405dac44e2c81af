"""fewstep._dispatch: which backend runs, and errors that say why one cannot."""
import pytest
import torch

import fewstep
from fewstep import _dispatch

CPU = torch.device("cpu")


def test_auto_on_cpu_is_the_compiled_kernel():
    assert _dispatch.select("op", CPU) == "cpu"


def test_forced_backends_and_env(monkeypatch):
    with fewstep.backend("reference"):
        assert _dispatch.select("op", CPU) == "reference"
        with fewstep.backend("cpu"):  # nesting: the innermost wins, and is undone on exit
            assert _dispatch.select("op", CPU) == "cpu"
        assert _dispatch.select("op", CPU) == "reference"
    monkeypatch.setenv("FEWSTEP_BACKEND", "reference")
    assert _dispatch.select("op", CPU) == "reference"
    with fewstep.backend("cpu"):  # the context manager beats the environment
        assert _dispatch.select("op", CPU) == "cpu"


def test_op_without_triton_kernel_runs_the_compiled_one():
    with fewstep.backend("triton"):
        assert _dispatch.select("op", CPU, has_triton=False) == "cpu"


def test_unavailable_backend_names_op_backend_and_reason():
    with fewstep.backend("cuda"), pytest.raises(fewstep.BackendUnavailableError,
                                                match=r"fewstep.my_op: backend 'cuda' is unavailable: .*CUDA"):
        _dispatch.select("my_op", CPU)
