"""A user's model and a user's data through the CLI, as the README promises: a 5-class network in a Python file, a
folder whose void label is 99, class names from classes.txt — no CamVid, no ESPNet anywhere."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcal.cli import main

CLASSES = ["sky", "road", "car", "tree", "person"]
VOID = 99

USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's segmentation network: float RGB 0-255 in, 5-class logits at 1/2 resolution out (in a dict)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return {"out": self.head(torch.tanh(self.body(x / 64.0 - 2.0))) * 3.0}


def build():
    torch.manual_seed(0)
    return Net().eval()
'''


def _write_split(root: Path, split: str, n: int, rng: np.random.Generator, labels: bool = True) -> None:
    (root / split / "images").mkdir(parents=True)
    if labels:
        (root / split / "labels").mkdir(parents=True)
    for i in range(n):
        h, w = 24, 32
        label = rng.integers(0, len(CLASSES), (h, w)).astype(np.uint8)
        image = (label[..., None] * 40 + rng.integers(0, 60, (h, w, 3))).astype(np.uint8)
        label[:3] = VOID
        Image.fromarray(image).save(root / split / "images" / f"{split}_{i:02d}.png")
        if labels:
            Image.fromarray(label).save(root / split / "labels" / f"{split}_{i:02d}.png")


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("userdata")
    rng = np.random.default_rng(0)
    for split, n in (("val", 6), ("test", 5)):
        _write_split(root / "data", split, n, rng)
    _write_split(root / "data", "unlabelled", 2, rng, labels=False)
    (root / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "usermodel.py").write_text(USER_MODEL)
    return root / "usermodel.py", root / "data"


def _independent_ece(model_file: Path, split_dir: Path, n_bins: int = 15) -> float:
    """ECE of the user's model on a split, from the equations: float64, equal-width bins (b/n, (b+1)/n]."""
    spec = importlib.util.spec_from_file_location("independent_user_model", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.build()
    confs, hits = [], []
    for image_path in sorted((split_dir / "images").glob("*.png")):
        image = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32)
        label = np.asarray(Image.open(split_dir / "labels" / image_path.name))
        with torch.no_grad():
            out = net(torch.from_numpy(image).permute(2, 0, 1)[None])["out"]
            out = torch.nn.functional.interpolate(out, size=label.shape, mode="bilinear", align_corners=False)
        prob = out[0].double().softmax(0).numpy()
        valid = label != VOID
        confs.append(prob.max(0)[valid])
        hits.append((prob.argmax(0) == label)[valid])
    conf, hit = np.concatenate(confs), np.concatenate(hits).astype(float)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(hit[m].mean() - conf[m].mean())
    return ece


def test_benchmark_on_user_model_and_void_99_folder(tmp_path, user_setup):
    pytest.importorskip("matplotlib")
    model_file, data = user_setup
    out = tmp_path / "OUT"
    argv = ["benchmark", "--model", f"{model_file}:build", "--data", str(data), "--ignore-index", "99",
            "--preprocess", "none", "--calibrators", "ts", "isotonic", "--detectors", "msp", "energy",
            "--out", str(out), "--cache", str(tmp_path / "cache"), "--corruptions", "--no-anomalies",
            "--bootstrap", "50"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["class_names"] == CLASSES
    assert results["meta"]["ignore_index"] == VOID and results["meta"]["num_classes"] == 5
    test = results["calibration"]["test"]
    assert set(test) == {"uncalibrated", "ts", "isotonic"}
    assert test["uncalibrated"]["ece"] == pytest.approx(_independent_ece(model_file, data / "test"), abs=1e-6)
    assert set(results["detection"]["IDM: test (positive = mispredicted pixel)"]) == {"msp", "energy"}
    assert main(["report", str(out)]) == 0
    html = (out / "index.html").read_text()
    for name in CLASSES:
        assert name in html
    assert "? on ?" not in html


def test_ignore_index_none_and_unlabelled_detect(tmp_path, user_setup):
    model_file, data = user_setup
    store = tmp_path / "store"
    # no void label: 99 is then an unknown class label and must be refused, not silently counted
    code = main(["predict", "--model", f"{model_file}:build", "--data", str(data), "--split", "val",
                 "--ignore-index", "none", "--preprocess", "none", "--out", str(store)])
    assert code == 1
    scores = tmp_path / "scores"
    assert main(["detect", "--model", f"{model_file}:build", "--preprocess", "none", "--detector", "energy",
                 "--data", str(data), "--split", "unlabelled", "--out", str(scores)]) == 0
    maps = sorted(scores.glob("*.npy"))
    assert len(maps) == 2 and np.load(maps[0]).shape == (24, 32)


def test_store_carries_ignore_index_into_fit_and_evaluate(tmp_path, user_setup):
    model_file, data = user_setup
    store = tmp_path / "store"
    assert main(["predict", "--model", f"{model_file}:build", "--data", str(data), "--split", "val",
                 "--ignore-index", "99", "--preprocess", "none", "--out", str(store)]) == 0
    from segcal.data import LogitsStore

    assert LogitsStore(store).ignore_index == VOID
    assert main(["fit", "--calibrator", "ts", "--logits", str(store), "--out", str(tmp_path / "ts.pt")]) == 0
    assert main(["evaluate", "--logits", str(store), "--calibrator", str(tmp_path / "ts.pt"),
                 "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["ece"] <= 1.0


def test_torchscript_model_spec(tmp_path, user_setup):
    model_file, data = user_setup
    spec = importlib.util.spec_from_file_location("ts_user_model", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = module.build()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)["out"]

    scripted = tmp_path / "model.ts"
    torch.jit.script(Plain()).save(str(scripted))
    store = tmp_path / "ts-store"
    assert main(["predict", "--model", str(scripted), "--data", str(data), "--split", "test", "--ignore-index", "99",
                 "--preprocess", "none", "--out", str(store)]) == 0
    from segcal.data import LogitsStore

    assert LogitsStore(store).num_classes == 5 and len(LogitsStore(store)) == 5


def test_a_calibrator_registered_in_user_code_reaches_fit_and_benchmark(tmp_path, user_setup):
    from segcal.calibrators import Calibrator, TemperatureScaling

    class HalfTemperature(TemperatureScaling):
        """Dummy user calibrator: TS, then halves the logits' confidence further."""

        name = "half-temperature"

        def transform(self, logits, images=None):
            return super().transform(logits) / 2

    assert issubclass(HalfTemperature, Calibrator)
    model_file, data = user_setup
    store = tmp_path / "store"
    assert main(["predict", "--model", f"{model_file}:build", "--data", str(data), "--split", "val",
                 "--ignore-index", "99", "--preprocess", "none", "--out", str(store)]) == 0
    assert main(["fit", "--calibrator", "half_temperature", "--logits", str(store),
                 "--out", str(tmp_path / "half.pt")]) == 0
    out = tmp_path / "bench"
    assert main(["benchmark", "--model", f"{model_file}:build", "--data", str(data), "--ignore-index", "99",
                 "--preprocess", "none", "--calibrators", "half-temperature", "--detectors", "msp",
                 "--corruptions", "--no-anomalies", "--bootstrap", "0", "--out", str(out),
                 "--cache", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "half-temperature" in results["calibration"]["test"]


def test_conformal_command_and_protocol_stage(tmp_path, user_setup):
    model_file, data = user_setup
    stores = {}
    for split in ("val", "test"):
        stores[split] = tmp_path / split
        assert main(["predict", "--model", f"{model_file}:build", "--data", str(data), "--split", split,
                     "--ignore-index", "99", "--preprocess", "none", "--out", str(stores[split])]) == 0
    assert main(["conformal", "--method", "coverage", "--alpha", "0.2", "--arg", "epsilon=0.2",
                 "--logits", str(stores["val"]), "--eval", f"test={stores['test']}", "--out", str(tmp_path / "c.pt"),
                 "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["splits"]["test"]["n_images"] == 5 and result["alpha"] == 0.2
    from segcal.conformal import load

    assert load(tmp_path / "c.pt").ignore_index == VOID
    out = tmp_path / "bench"
    assert main(["benchmark", "--model", f"{model_file}:build", "--data", str(data), "--ignore-index", "99",
                 "--preprocess", "none", "--calibrators", "ts", "--detectors", "msp", "--corruptions",
                 "--no-anomalies", "--bootstrap", "0", "--conformal", "fnr:alpha=0.2,class_index=1",
                 "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["conformal"]["fnr:alpha=0.2,class_index=1"]["splits"]["test"]["n_images"] == 5
    assert "Conformal risk control" in (out / "index.html").read_text()
