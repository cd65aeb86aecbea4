"""Which ``base`` should Selective Scaling compose by default? (issue 15 item 3)

    python scripts/selective_base_study.py --logits /work/cache/logits/espnet-camvid [--out results.json]

Fits TS, isotonic and Selective Scaling with ``base`` = identity (the paper), TS (base fitted on held-out images, the
default, and on all images) and isotonic on the ``val`` logits store, and reports test ECE/NLL/Brier on every frame
of the ``test`` store (15 equal-width bins, the store's ``ignore_index``). Deterministic (seed 0 everywhere).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from segcal.calibrators import IsotonicCalibration, SelectiveScaling, TemperatureScaling
from segcal.data import LogitsStore
from segcal.metrics import CalibrationMetrics

CANDIDATES = {
    "ts": lambda ii: TemperatureScaling(ii),
    "isotonic": lambda ii: IsotonicCalibration(ignore_index=ii),
    "selective(base=None) [paper]": lambda ii: SelectiveScaling(None, ignore_index=ii),
    "selective(base=ts) [default]": lambda ii: SelectiveScaling("ts", ignore_index=ii),
    "selective(base=ts, base_data=all)": lambda ii: SelectiveScaling("ts", base_data="all", ignore_index=ii),
    "selective(base=isotonic)": lambda ii: SelectiveScaling("isotonic", ignore_index=ii),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logits", required=True, help="folder holding the val/ and test/ logits stores")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    val, test = LogitsStore(Path(args.logits) / "val"), LogitsStore(Path(args.logits) / "test")
    ii = test.ignore_index  # recorded in the store manifest (None = no void label)
    fitted, times = {}, {}
    for name, make in CANDIDATES.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        fitted[name] = make(ii).fit(lambda: val.batches(batch_size=4))
        times[name] = time.perf_counter() - start
    metrics = {k: CalibrationMetrics(test.num_classes, n_bins=15, ignore_index=ii, classwise=False)
               for k in ("uncalibrated", *fitted)}
    with torch.inference_mode():
        for batch in test.batches(batch_size=4):
            z, y = batch["logits"].float(), batch["target"]
            metrics["uncalibrated"].update(z, y)
            for name, cal in fitted.items():
                metrics[name].update(cal.transform(z), y)
    rows = {}
    for name, metric in metrics.items():
        res = metric.compute()
        rows[name] = {k: float(res[k]) for k in ("ece", "nll", "brier")}
        rows[name]["fit_s"] = times.get(name)
        print(f"{name:36s} ECE {rows[name]['ece']:.4f}  NLL {rows[name]['nll']:.4f}  Brier {rows[name]['brier']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"fit": f"val ({len(val)})", "eval": f"test ({len(test)})",
                                              "results": rows}, indent=1))


if __name__ == "__main__":
    main()
