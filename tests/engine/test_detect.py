"""detect_folder resumes only maps computed with the same detector, model and image (issue 12 item 6)."""

from __future__ import annotations

import os

import numpy as np
import torch
from engine_toys import ToySegmenter
from PIL import Image

from segcal.detectors import get_detector
from segcal.engine.detect import detect_folder


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "img"
    folder.mkdir()
    for stem, (h, w) in {"a": (12, 16), "b": (9, 13)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    return folder


def _maps(out):
    return {p.stem: np.load(p) for p in sorted(out.glob("*.npy"))}


def test_rerun_skips_only_identical_work_and_recomputes_the_rest(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    model = ToySegmenter(num_classes=3)
    detect_folder(model, get_detector("energy"), folder, out, progress=False)
    energy = _maps(out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    detect_folder(model, get_detector("energy"), folder, out, progress=False)  # same key: nothing rewritten
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}

    detect_folder(model, get_detector("msp"), folder, out, progress=False)  # another detector: new maps
    msp = _maps(out)
    ref = {k: v for k, v in _maps_of(model, "msp", folder, tmp_path / "fresh").items()}
    for k in energy:
        np.testing.assert_array_equal(msp[k], ref[k])
        assert not np.array_equal(msp[k], energy[k])

    other = ToySegmenter(num_classes=3, seed=7)  # another model: recomputed
    detect_folder(other, get_detector("msp"), folder, out, progress=False)
    for k, v in _maps_of(other, "msp", folder, tmp_path / "fresh2").items():
        np.testing.assert_array_equal(_maps(out)[k], v)

    # a changed input image (new pixels, new mtime) is recomputed; the other map is kept
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    os.utime(folder / "a.png", ns=(1, 10**18))
    b_stamp = (out / "b.npy").stat().st_mtime_ns
    detect_folder(other, get_detector("msp"), folder, out, progress=False)
    assert (out / "b.npy").stat().st_mtime_ns == b_stamp
    np.testing.assert_array_equal(_maps(out)["a"], _maps_of(other, "msp", folder, tmp_path / "fresh3")["a"])


def test_maps_without_a_record_are_recomputed(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    out.mkdir()
    np.save(out / "a.npy", np.zeros((12, 16), np.float16))  # left by an older segcal or another tool
    model = ToySegmenter(num_classes=3)
    detect_folder(model, get_detector("entropy"), folder, out, progress=False)
    assert torch.from_numpy(_maps(out)["a"].astype(np.float32)).abs().sum() > 0


def _maps_of(model, name, folder, out):
    detect_folder(model, get_detector(name), folder, out, progress=False)
    return _maps(out)
