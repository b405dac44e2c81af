"""`fewstep demo`: its metric, its figure, and a quick end-to-end run with the documented outputs."""
import json
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from fewstep.demo import data as demo_data
from fewstep.demo import figure, run
from fewstep.demo.models import MLPDenoiser, with_cond_input


def test_sliced_wasserstein_is_exact_for_a_shift_and_zero_for_equal_sets():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 3, generator=gen, dtype=torch.float64)
    assert demo_data.sliced_wasserstein2(a, a[torch.randperm(500, generator=gen)]) == pytest.approx(0, abs=1e-12)
    # A shift by s moves every projection onto direction u by s.u: SW2^2 = mean over u of (s.u)^2 = |s|^2 / dim.
    shift = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    expected = (shift.square().sum() / 3).sqrt().item()
    assert demo_data.sliced_wasserstein2(a + shift, a, num_projections=20000) == pytest.approx(expected, rel=0.02)
    with pytest.raises(ValueError, match="equal shape"):
        demo_data.sliced_wasserstein2(a, a[:10])


def test_datasets_split_into_disjoint_equal_halves():
    ds = demo_data.mixture2d(train_size=300, eval_size=100)
    a, b = ds.halves()
    assert a.shape == b.shape == (100, 2) and ds.eval_labels().shape == (100,)
    assert not torch.equal(a, b)
    assert torch.equal(ds.heldout_y[:100], ds.heldout_y[100:])  # same classes in both halves
    assert demo_data.sliced_wasserstein2(a, b) < demo_data.sliced_wasserstein2(a, torch.zeros_like(a))
    with pytest.raises(ValueError, match="dataset: expected one of"):
        demo_data.load("cifar")


def test_student_with_cond_input_computes_the_teacher_function_until_trained():
    teacher = MLPDenoiser(5, num_classes=3, hidden=16, depth=2)
    student = with_cond_input(teacher, cond_dim=4)
    x, t, y = torch.randn(7, 5), torch.randint(0, 1000, (7,)), torch.randint(0, 4, (7,))
    torch.testing.assert_close(student(x, t, class_labels=y, timestep_cond=torch.randn(7, 4)),
                               teacher(x, t, class_labels=y))
    with pytest.raises(ValueError, match="timestep_cond"):
        teacher(x, t, timestep_cond=torch.randn(7, 4))


def test_png_writer_round_trips_pixels(tmp_path):
    image = torch.rand(9, 13)
    path = tmp_path / "x.png"
    figure.write_png(path, image)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == (13, 9)
    idat = raw.index(b"IDAT")
    length = struct.unpack(">I", raw[idat - 4:idat])[0]
    rows = zlib.decompress(raw[idat + 4:idat + 4 + length])
    pixels = torch.tensor(list(rows), dtype=torch.float64).view(9, 14)[:, 1:]
    torch.testing.assert_close(pixels, (image.double() * 255).round(), atol=0, rtol=0)


def test_quick_demo_writes_the_documented_outputs(tmp_path):
    results = run(str(tmp_path), device="cpu", datasets=("mixture2d",), quick=True, log=lambda *_: None)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["dataset"] == "mixture2d" and summary["metric"] == "sliced_wasserstein2"
    assert summary["floor"] == pytest.approx(results[0]["floor"]) and summary["floor"] > 0
    runs = {(r["model"], r["steps"]) for r in summary["runs"]}
    assert {("teacher", 50), ("teacher", 4), ("teacher", 1), ("lcd", 4), ("dmd2", 1), ("boot", 1)} <= runs
    for r in summary["runs"]:
        assert set(r) == {"model", "sampler", "steps", "nfe", "seconds", "metric"}
        assert r["metric"] > 0 and r["seconds"] >= 0 and r["nfe"] >= r["steps"]
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert "Targets" in (tmp_path / "report.md").read_text()


def test_cli_rejects_an_unknown_dataset():
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "demo", "--datasets", "cifar"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--datasets" in proc.stderr
