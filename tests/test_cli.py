"""The `segcal` command: help, predict → fit → evaluate round trip, torchrun-identical JSON, detect on odd sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcal.cli import COMMANDS, main
from segcal.models import build_espnet, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "toy.pt", build_espnet("camvid", num_classes=5,
                                                                                       name="toy-espnet"))


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    (root / "lbl").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "img" / f"f{i}.png")
        label = rng.integers(0, 5, (40, 56)).astype(np.uint8)
        label[:3] = 255
        Image.fromarray(label).save(root / "lbl" / f"f{i}.png")
    return root / "img", root / "lbl"


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_predict_fit_evaluate_round_trip(tmp_path, checkpoint, labelled_folder, capsys):
    images, labels = labelled_folder
    store = tmp_path / "store"
    assert main(["predict", "--model", str(checkpoint), "--images", str(images), "--labels", str(labels),
                 "--out", str(store)]) == 0
    assert main(["fit", "--calibrator", "ts", "--logits", str(store), "--out", str(tmp_path / "ts.pt")]) == 0
    assert main(["evaluate", "--logits", str(store), "--json", str(tmp_path / "raw.json")]) == 0
    assert main(["evaluate", "--logits", str(store), "--calibrator", str(tmp_path / "ts.pt"),
                 "--json", str(tmp_path / "ts.json")]) == 0
    raw = json.loads((tmp_path / "raw.json").read_text())
    cal = json.loads((tmp_path / "ts.json").read_text())
    assert raw["n_images"] == 5 and 0 <= raw["ece"] <= 1
    assert cal["nll"] <= raw["nll"] + 1e-9  # TS minimises NLL on exactly these pixels
    # Temperature never changes the argmax of the logits; the metric's accuracy (argmax of float32 softmax) may move
    # by a hair on this untrained net's float16 near-ties, which softmax(z / T) with a large T rounds into exact ties.
    from segcal.calibrators import load as load_calibrator
    from segcal.data import LogitsStore

    ts = load_calibrator(tmp_path / "ts.pt")
    for batch in LogitsStore(store).batches(8):
        assert torch.equal(ts.transform(batch["logits"]).argmax(1), batch["logits"].argmax(1))
    assert abs(cal["accuracy"] - raw["accuracy"]) < 0.01


def test_bad_input_gives_clear_error_not_traceback(tmp_path, capsys):
    assert main(["evaluate", "--logits", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "no logits store" in err and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_evaluate_json_identical(tmp_path, checkpoint, labelled_folder):
    images, labels = labelled_folder
    store = tmp_path / "store"
    assert main(["predict", "--model", str(checkpoint), "--images", str(images), "--labels", str(labels),
                 "--out", str(store)]) == 0
    assert main(["evaluate", "--logits", str(store), "--json", str(tmp_path / "one.json")]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "segcal", "evaluate", "--logits",
                    str(store), "--json", str(tmp_path / "two.json")], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=180)
    assert (tmp_path / "one.json").read_text() == (tmp_path / "two.json").read_text()


def test_detect_writes_float16_maps_at_each_image_size(tmp_path, checkpoint):
    rng = np.random.default_rng(1)
    folder = tmp_path / "odd"
    folder.mkdir()
    sizes = {"a": (37, 61), "b": (64, 48), "c": (9, 13)}
    for stem, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    out = tmp_path / "scores"
    assert main(["detect", "--model", str(checkpoint), "--detector", "energy", "--images", str(folder),
                 "--out", str(out)]) == 0
    for stem, hw in sizes.items():
        score = np.load(out / f"{stem}.npy")
        assert score.dtype == np.float16 and score.shape == hw and np.isfinite(score).all()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["detect", "--model", str(checkpoint), "--detector", "energy", "--images", str(folder),
                 "--out", str(out)]) == 0  # resumed: nothing rewritten
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_evaluate_detection_on_a_store(tmp_path, checkpoint, labelled_folder, capsys):
    images, labels = labelled_folder
    store = tmp_path / "store"
    assert main(["predict", "--model", str(checkpoint), "--images", str(images), "--labels", str(labels),
                 "--out", str(store)]) == 0
    assert main(["evaluate-detection", "--logits", str(store), "--detectors", "msp", "entropy",
                 "--json", str(tmp_path / "det.json")]) == 0
    res = json.loads((tmp_path / "det.json").read_text())["idm"]
    assert set(res) == {"msp", "entropy"}
    for r in res.values():
        assert 0 <= r["auroc"] <= 1 and 0 <= r["fpr95"] <= 1 and len(r["roc"]) == 2
    assert main(["evaluate-detection", "--detectors", "msp"]) == 1  # neither --logits nor --anomalies
    assert "--logits" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_fit_ts_equals_one_process(tmp_path, checkpoint, labelled_folder):
    images, labels = labelled_folder
    store = tmp_path / "store"
    assert main(["predict", "--model", str(checkpoint), "--images", str(images), "--labels", str(labels),
                 "--out", str(store)]) == 0
    assert main(["fit", "--calibrator", "ts", "--logits", str(store), "--out", str(tmp_path / "one.pt")]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "segcal", "fit", "--calibrator", "ts",
                    "--logits", str(store), "--out", str(tmp_path / "two.pt")], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=180)
    from segcal.calibrators import load as load_calibrator

    one, two = load_calibrator(tmp_path / "one.pt"), load_calibrator(tmp_path / "two.pt")
    assert abs(one.temperature_ - two.temperature_) < 1e-6


def test_train_on_synthetic_writes_a_loadable_checkpoint_and_resumes(tmp_path, checkpoint):
    out = tmp_path / "run"
    args = ["train", "--model", str(checkpoint), "--data", "synthetic", "--max-steps-per-epoch", "2", "--loss", "mbls",
            "--loss-arg", "margin=5", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 0
    from segcal.models import load

    model = load(out / "last.pt")
    assert model.num_classes == 5
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 1 and log[-1]["steps"] == 2
    assert main(args) == 0  # finished run: resume does nothing new
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_train_refuses_to_resume_with_other_settings(tmp_path, checkpoint, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", str(checkpoint), "--data", "synthetic", "--max-steps-per-epoch", "1", "--epochs", "1",
            "--out", str(out)]
    assert main([*base, "--batch-size", "4"]) == 0
    assert main([*base, "--batch-size", "2"]) == 1
    assert "different settings" in capsys.readouterr().err
