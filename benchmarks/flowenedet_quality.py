"""Quality of FlowEneDet's coarse scoring path (``score_stride``) with the shipped ESPNet-CamVid fits (issue 14).

The library protocol on a reduced, evenly spaced subset of CamVid **test**:
  * IDM (positive = ``argmax ≠ label`` on valid pixels), per-image AUROC / AP averaged, plus pooled AUROC —
    ``segcal.engine.protocol.evaluate_idm_on_sets`` over ``--idm-frames`` frames of the cached test store (logits +
    decoder features; predicted into ``--cache`` if absent);
  * pasted-anomaly OOD, pooled AUROC / AP / FPR95 — ``evaluate_anomalies`` on ``--ood-frames`` frames.
Every FED-U / FED-C row is the same shipped fit (``DETECTORS.resolve(...).pretrained("espnet-camvid")``) scored at a
different ``score_stride``; MSP is the reference row.

Usage (≈ 3 min on the shared 2-core machine):
    PYTHONPATH=src SEGCAL_DATA=/work/shared/data .venv/bin/python benchmarks/flowenedet_quality.py --cache /work/cache
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from segcal.detectors import DETECTORS
from segcal.engine import protocol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("cache"))
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--idm-frames", type=int, default=60)
    ap.add_argument("--ood-frames", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cfg = protocol.BenchmarkConfig(out=Path(tempfile.mkdtemp()), cache=args.cache, progress=False,
                                   n_shift_images=args.ood_frames)
    model = protocol.load_model(cfg, "espnet-camvid")
    test = protocol.make_dataset(cfg, "test", model.num_classes)
    store = protocol.cached_store(model, "espnet-camvid", test, "test", cfg, features=True)
    names = list(store.names)
    idx = torch.linspace(0, len(names) - 1, min(args.idm_frames, len(names))).round().long().tolist()
    subset = [names[i] for i in idx]

    dets: dict[str, object] = {"msp": DETECTORS.resolve("msp")()}
    for variant in ("u", "c"):
        for r in args.strides:
            det = DETECTORS.resolve(f"flowenedet-{variant}").pretrained("espnet-camvid")
            det.score_stride = r
            dets[f"FED-{variant.upper()} stride {r}"] = det

    idm = protocol.evaluate_idm_on_sets(store, test, dets, cfg, {"sub": subset})["sub"]
    ood = protocol.evaluate_anomalies(model, test, dets, cfg)
    print(f"IDM: {len(subset)} evenly spaced CamVid test frames; OOD: pasted anomalies on {args.ood_frames} frames")
    print("| detector | IDM AUROC (per image) | IDM AP (per image) | IDM AUROC (pooled) | OOD AUROC | OOD AP | "
          "OOD FPR95 |\n|---|---|---|---|---|---|---|")
    for d in dets:
        i, o = idm[d], ood[d]
        row = [i.get("auroc_per_image"), i.get("ap_per_image"), i.get("auroc"), o.get("auroc"), o.get("ap"),
               o.get("fpr95")]
        print(f"| {d} | " + " | ".join("—" if v is None else f"{100 * float(v):.1f}" for v in row) + " |")


if __name__ == "__main__":
    main()
