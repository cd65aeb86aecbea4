"""Full-split quality of the published ESPNet weights on CamVid (needs SEGCAL_DATA): a configuration of the protocol.

Rows: CamVid model on val, test, and test per sequence (the dataset's named subsets: 0001TP = dusk, Seq05VD = unseen);
Cityscapes model on CamVid test with classes merged (a domain shift). Columns: mIoU, pixel accuracy, NLL, top-label
ECE (15 equal-width bins, pooled over pixels), misclassification AUROC of the max-softmax probability. Void pixels
are ignored everywhere. Every number comes from ``segcal.engine.protocol`` (cached float32 logits stores,
``evaluate_calibrators_on_sets`` with no calibrator, ``evaluate_idm_on_sets`` with the ``msp`` detector).

Usage::

    SEGCAL_DATA=/path/to/data python benchmarks/espnet_quality.py [--cache /work/cache] [--limit N] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from segcal.detectors import DETECTORS
from segcal.engine.protocol import (
    BenchmarkConfig,
    build_method,
    cached_store,
    eval_sets,
    evaluate_calibrators_on_sets,
    evaluate_idm_on_sets,
    load_model,
    make_dataset,
)

RUNS = (("espnet-camvid", "val"), ("espnet-camvid", "test"), ("espnet-cityscapes", "test"))


def run(cfg: BenchmarkConfig, spec: str, split: str) -> dict[str, dict]:
    """``{set: metrics}`` for one model on one split and its named subsets."""
    model = load_model(cfg, spec)
    dataset = make_dataset(cfg, split, int(model.num_classes))
    store = cached_store(model, spec, dataset, split, cfg)
    sets = eval_sets(split, store)
    cal, _ = evaluate_calibrators_on_sets(store, dataset, {}, cfg, sets)
    msp = {"msp": build_method(DETECTORS, "msp", store.ignore_index)}
    idm = evaluate_idm_on_sets(store, dataset, msp, cfg, sets)
    return {k: {**cal[k]["uncalibrated"], "auroc_msp": idm[k]["msp"]["auroc"]} for k in sets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="N evenly spaced images per split (quick look)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="logits cache folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchmarkConfig(out=Path("."), cache=args.cache, n_images=args.limit, bootstrap_resamples=0, progress=False)
    rows = []
    t0 = time.time()
    for spec, split in RUNS:
        for label, m in run(cfg, spec, split).items():
            rows.append((spec, label.replace(f"{split} ", f"{split}, "), m))
        print(f"  done {spec} on {split} ({time.time() - t0:.0f} s)", flush=True)
    print()
    print("| model | CamVid split | mIoU | pixel acc. | NLL | ECE(15) % | MSP error AUROC |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for spec, label, m in rows:
        print(f"| {spec} | {label} | {100 * m['miou']:.1f} | {100 * m['accuracy']:.1f} | {m['nll']:.3f} | "
              f"{100 * m['ece']:.1f} | {m['auroc_msp']:.3f} |")


if __name__ == "__main__":
    main()
