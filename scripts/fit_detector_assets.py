"""Fit the detectors shipped for ``espnet-camvid`` and write them to ``src/segcal/assets/``.

    python scripts/fit_detector_assets.py --cache cache

Needs the logits stores of ``segcal predict`` (created here when missing): CamVid train (SML statistics, as in the
SML and FlowEneDet papers; shared by both detectors) and CamVid val with decoder features (FlowEneDet is fit on
val: its errors resemble test errors far more than the ~3 % training errors do; test is never touched).
Deterministic (seed 0). Output: ``sml-espnet-camvid.pt`` and ``flowenedet-{u,c}-espnet-camvid.pt`` (~70 kB each).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from segcal import models
from segcal.data import CamVid
from segcal.detectors import FlowEneDet, StandardizedMaxLogit, fit_sml_statistics
from segcal.engine import predict

ASSETS = Path(__file__).resolve().parents[1] / "src" / "segcal" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--model", default="espnet-camvid")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = models.load(args.model)
    root = Path(args.cache) / "logits" / args.model
    train = predict(model, CamVid(split="train"), root / "train", features=True)
    val = predict(model, CamVid(split="val"), root / "val", features=True)
    ASSETS.mkdir(parents=True, exist_ok=True)
    log = {}
    start = time.perf_counter()
    stats = fit_sml_statistics(lambda: train.batches(4))
    StandardizedMaxLogit(stats.class_mean_, stats.class_std_).save(ASSETS / f"sml-{args.model}.pt")
    log["sml_fit_s"] = time.perf_counter() - start
    for variant in ("u", "c"):
        start = time.perf_counter()
        det = FlowEneDet(variant=variant, epochs=args.epochs, seed=0, sml=stats).fit(val)
        det.save(ASSETS / f"flowenedet-{variant}-{args.model}.pt")
        log[f"flowenedet_{variant}_fit_s"] = time.perf_counter() - start
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
