"""Shared test setup: Triton runs under its CPU interpreter when there is no GPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")


def pytest_report_header(config):
    import fewstep
    return [f"fewstep build: {fewstep.build_info()}", f"CUDA available: {HAS_CUDA}"]
