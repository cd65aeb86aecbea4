"""Try bad inputs on every public entry point and write what happens to ``docs/hardening.md``.

    python scripts/hardening_table.py            # rewrites docs/hardening.md (no real data needed)

Each row is executed, not described: the message column is the exception text segcal raised. A row whose call
does *not* raise (or raises something other than the expected type) makes the script exit non-zero.
"""

from __future__ import annotations

import errno
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from segcal.calibrators import TemperatureScaling
from segcal.data import LogitsStore, SegmentationFolder
from segcal.detectors import energy
from segcal.engine import predict
from segcal.losses import NACLLoss
from segcal.metrics import CalibrationMetrics, DetectionMetrics
from segcal.models import build_espnet, load

OUT = Path(__file__).resolve().parents[1] / "docs" / "hardening.md"
TMP = Path(tempfile.mkdtemp(prefix="segcal-hardening-"))


def _logits(n: int = 1, c: int = 5, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def _target(n: int = 1, h: int = 8, w: int = 8, c: int = 5) -> torch.Tensor:
    return torch.randint(0, c, (n, h, w), generator=torch.Generator().manual_seed(1))


def nan_logits() -> None:
    z = _logits(2)
    z[1, 0, 3, 3] = float("nan")
    CalibrationMetrics(5).update(z, _target(2))


def inf_logits_fit() -> None:
    z = _logits()
    z[0, 2, 0, 0] = float("inf")
    TemperatureScaling().fit(z, _target())


def wrong_rank() -> None:
    CalibrationMetrics(5).update(_logits()[0], _target())


def float_target() -> None:
    CalibrationMetrics(5).update(_logits(), _target().float())


def class_mismatch_metric() -> None:
    CalibrationMetrics(11).update(_logits(c=5), _target())


def class_mismatch_calibrator() -> None:
    TemperatureScaling().fit(_logits(c=5), _target()).transform(_logits(c=11))


def label_out_of_range() -> None:
    t = _target()
    t[0, 0, 0] = 20
    CalibrationMetrics(5).update(_logits(), t)


def loss_shape_mismatch() -> None:
    NACLLoss()(_logits(h=8, w=8), _target(h=8, w=9))


def detector_nan() -> None:
    z = _logits()
    z[0, 0, 0, 0] = float("nan")
    energy(z)


def detection_not_bool() -> None:
    DetectionMetrics().update(torch.rand(1, 4, 4), torch.rand(1, 4, 4))


def unfitted_calibrator() -> None:
    TemperatureScaling().transform(_logits())


def empty_folder() -> None:
    (TMP / "empty").mkdir(exist_ok=True)
    SegmentationFolder(TMP / "empty")


def corrupt_image() -> None:
    folder = TMP / "corrupt"
    folder.mkdir(exist_ok=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    SegmentationFolder(folder)[0]


def _store(name: str, entries: int = 3) -> Path:
    path = TMP / name
    store = LogitsStore.create(path, {"model": "toy", "dataset": "toy", "split": "val", "num_classes": 5})
    for i in range(entries):
        store.write(f"img{i}", _logits()[0], _target()[0])
    store.finalize()
    return path


def truncated_entry() -> None:
    path = _store("truncated")
    entry = sorted((path / "entries").iterdir())[1]
    entry.write_bytes(entry.read_bytes()[:100])
    list(LogitsStore(path))


def store_of_other_model() -> None:
    path = _store("other")
    LogitsStore.create(path, {"model": "another-model", "dataset": "toy", "split": "val", "num_classes": 5})


def missing_store() -> None:
    LogitsStore(TMP / "does-not-exist")


class _Images:
    def __init__(self) -> None:
        self.names = [f"f{i}" for i in range(4)]

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng(i)
        return {"image": rng.integers(0, 255, (16, 24, 3), dtype=np.uint8),
                "target": rng.integers(0, 5, (16, 24)), "name": self.names[i]}


torch.manual_seed(0)
_MODEL = build_espnet("camvid", num_classes=5)


def disk_full_during_predict() -> None:
    model = _MODEL
    real_replace = __import__("os").replace
    calls = {"n": 0}

    def flaky_replace(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        real_replace(src, dst)

    with mock.patch("os.replace", flaky_replace):
        predict(model, _Images(), TMP / "diskfull", batch_size=1, progress=False)


def unknown_model() -> None:
    load("no-such-model")


def missing_weights() -> None:
    with mock.patch.dict("os.environ", {"SEGCAL_DATA": str(TMP / "nowhere")}):
        load("espnet-camvid")


def float_image() -> None:
    build_espnet("camvid", num_classes=5).predict_logits(np.zeros((16, 16, 3), dtype=np.float32))


def four_channel_image() -> None:
    build_espnet("camvid", num_classes=5).predict_logits(np.zeros((16, 16, 4), dtype=np.uint8))


CASES: list[tuple[str, str, Callable[[], None], type[BaseException]]] = [
    ("NaN in logits (image 1 of a batch)", "CalibrationMetrics.update", nan_logits, ValueError),
    ("inf in logits", "TemperatureScaling.fit", inf_logits_fit, ValueError),
    ("logits without batch axis (C,H,W)", "CalibrationMetrics.update", wrong_rank, ValueError),
    ("float labels", "CalibrationMetrics.update", float_target, TypeError),
    ("C of logits ≠ num_classes", "CalibrationMetrics.update", class_mismatch_metric, ValueError),
    ("C at transform ≠ C at fit", "TemperatureScaling.transform", class_mismatch_calibrator, ValueError),
    ("label 20 with C=5 (not ignore_index)", "CalibrationMetrics.update", label_out_of_range, ValueError),
    ("target (8,9) for logits (8,8)", "NACLLoss", loss_shape_mismatch, ValueError),
    ("NaN logits into a detector score", "detectors.energy", detector_nan, ValueError),
    ("float `positive` mask", "DetectionMetrics.update", detection_not_bool, TypeError),
    ("transform before fit", "TemperatureScaling.transform", unfitted_calibrator, ValueError),
    ("empty image folder", "SegmentationFolder", empty_folder, ValueError),
    ("unreadable / corrupt image file", "SegmentationFolder[i]", corrupt_image, ValueError),
    ("truncated store entry", "LogitsStore iteration", truncated_entry, ValueError),
    ("resume a store written by another model", "LogitsStore.create", store_of_other_model, ValueError),
    ("store path that does not exist", "LogitsStore", missing_store, FileNotFoundError),
    ("disk full on the 3rd entry of predict", "engine.predict", disk_full_during_predict, OSError),
    ("unknown model name", "models.load", unknown_model, ValueError),
    ("weights missing under SEGCAL_DATA", "models.load", missing_weights, FileNotFoundError),
    ("float32 image instead of uint8", "Segmenter.predict_logits", float_image, TypeError),
    ("RGBA (4-channel) image", "Segmenter.predict_logits", four_channel_image, ValueError),
]


def main() -> int:
    rows, failures = [], []
    for what, where, fn, expected in CASES:
        try:
            fn()
        except BaseException as err:  # every outcome is recorded
            ok = isinstance(err, expected)
            message = " ".join(str(err).split()).replace("|", "\\|").replace(str(TMP), "<tmp>")
            rows.append(f"| {what} | `{where}` | `{type(err).__name__}` | {message[:220]} |")
            if not ok:
                failures.append(f"{what}: expected {expected.__name__}, got {type(err).__name__}: {err}")
        else:
            rows.append(f"| {what} | `{where}` | **no error** | — |")
            failures.append(f"{what}: no error raised")
    after = LogitsStore(TMP / "diskfull") if (TMP / "diskfull" / "manifest.json").is_file() else None
    resumed = predict(_MODEL, _Images(), TMP / "diskfull", batch_size=1,
                      progress=False)
    note = (f"After the simulated full disk the store held {len(after) if after else 0} verified entries and no "
            f"partial file; rerunning `predict` completed it to {len(resumed)} entries.")
    text = "\n".join([
        "# Hardening: bad inputs and what segcal does with them", "",
        "Generated by `python scripts/hardening_table.py` — every row is executed; the message is the one raised.",
        "", "| bad input | entry point | raises | message |", "|---|---|---|---|", *rows, "", note, "",
        "Interrupted runs: `segcal predict` / `engine.predict` resume from verified entries "
        "(`tests/engine/test_store.py`), `segcal train` resumes bit-identically from its last epoch checkpoint "
        "(`tests/engine/test_training.py`), `segcal detect` skips finished score maps and writes each atomically "
        "(`tests/test_cli.py`), `segcal benchmark` reuses cached logits stores. CLI commands print "
        "`segcal <command>: error: <message>` and exit 1 instead of a traceback (`SEGCAL_DEBUG=1` re-raises).", "",
    ])
    OUT.write_text(text)
    print(text)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
