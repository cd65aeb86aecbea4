"""Error (IDM) and OOD detection on real data: every segcal detector on CamVid with the published ESPNet weights.

A configuration of ``segcal.engine.protocol``; this file holds only the study (FlowEneDet schedule variants, the
sections and their tables). Protocols (deterministic; every random choice is seeded):

1. **IDM on CamVid test** — ``evaluate_idm_on_sets``: positive = ``ŷ ≠ y`` on valid pixels; AUROC / AP / FPR95 per
   image then averaged, and pooled; on test and on each of its named subsets (0001TP = dusk, Seq05VD = unseen).
2. **Pasted anomalies** — ``evaluate_anomalies`` on ``--anomaly-frames`` evenly spaced test frames: positive = pasted
   pixels, negatives = valid in-distribution pixels; pooled OOD AUROC / AP / FPR95 and open-set mIoU.
3. **Domain shift** — ``evaluate_corruptions`` on ``--shift-frames`` evenly spaced test frames: ECE (15 bins), mIoU
   and pooled IDM AUROC per corruption and severity; plus the Cityscapes model → CamVid case (learned detectors
   re-fitted on its own CamVid-val logits).

Every learned detector (SML statistics, FlowEneDet, Selective) is fitted on CamVid val (the protocol's fit split),
never on test. Extra FlowEneDet rows (``--fed-variants``) probe the method: void handling, a longer schedule on
random crops, and the optional ``energy+msp`` input extension (not the paper's method). Speed: inference time vs the
ESPNet forward at 1 and 2 threads (median of ``--repeats`` interleaved runs).

Logits stores are cached under ``--cache`` (``segcal.engine.protocol.cached_store``); finished sections are kept in
``OUT/results.json`` (``--force SECTION`` redoes one).

Usage::

    SEGCAL_DATA=/work/shared/data nice -n 5 .venv/bin/python benchmarks/detection_camvid.py --cache /work/cache --quick
    SEGCAL_DATA=/work/shared/data nice -n 5 .venv/bin/python benchmarks/detection_camvid.py --cache /work/cache
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segcal.detectors import DETECTORS
from segcal.engine.protocol import (
    BenchmarkConfig,
    build_method,
    cached_store,
    eval_sets,
    evaluate_anomalies,
    evaluate_calibrators_on_sets,
    evaluate_corruptions,
    evaluate_idm_on_sets,
    fit_detectors,
    load_model,
    make_dataset,
)

BASELINES = ("msp", "max_logit", "entropy", "energy", "sml", "selective")
# row -> (registry name, kwargs, images per optimiser step). The first two are the library defaults (whole maps,
# batch 8, 4 epochs: ~52 optimiser steps on CamVid val, barely past the 50-step warm-up). "/long" = the same method
# with a longer schedule: 2 images per step, 4 random 128×128 crops each, 12 epochs (~600 steps). "+msp" = the
# optional energy+msp input extension (not the paper's method).
LONG = {"patch_size": 128, "patches_per_image": 4, "epochs": 12}
FED_CONFIGS: dict[str, tuple[str, dict[str, Any], int]] = {
    "flowenedet-u": ("flowenedet-u", {}, 8),
    "flowenedet-c": ("flowenedet-c", {}, 8),
    "fed-u/long": ("flowenedet-u", LONG, 2),
    "fed-c/long": ("flowenedet-c", LONG, 2),
    "fed-u/long/no-void": ("flowenedet-u", {"void_as_ood": False, **LONG}, 2),
    "fed-u+msp/long": ("flowenedet-u", {"inputs": "energy+msp", **LONG}, 2),
    "fed-c+msp/long": ("flowenedet-c", {"inputs": "energy+msp", **LONG}, 2),
}
# detectors scored under corruptions (the rest are ablations of the clean protocol)
SHIFT_DETS = ("msp", "max_logit", "entropy", "energy", "sml", "selective", "flowenedet-u", "flowenedet-c",
              "fed-u/long", "fed-c/long", "fed-u+msp/long")
SHIFT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression")
PCT = ("auroc", "ap", "fpr95", "ece", "miou")


class Results:
    """Finished sections, kept on disk so that a run resumes."""

    def __init__(self, path: Path, force: Sequence[str]) -> None:
        self.path, self.force = path, set(force)
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def done(self, key: str) -> bool:
        return key in self.data and key not in self.force

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def detectors(cfg: BenchmarkConfig, store: Any, dataset: Any, fed_names: Sequence[str], fit_log: dict[str, Any],
              prefix: str = "") -> dict[str, Any]:
    """The baselines and the FlowEneDet rows, learned ones fitted on ``store`` (fit times into ``fit_log``)."""
    dets = {n: build_method(DETECTORS, n, store.ignore_index) for n in BASELINES}
    for name, dt in fit_detectors(dets, store, dataset, cfg).items():
        fit_log[f"{prefix}{name}_fit_s"] = dt
    for name in fed_names:
        registry_name, kwargs, batch = FED_CONFIGS[name]
        params = {"seed": cfg.seed, **cfg.method_kwargs.get(registry_name, {}), **kwargs}
        det = {name: build_method(DETECTORS, registry_name, store.ignore_index, params)}
        for key, dt in fit_detectors(det, store, dataset, dataclasses.replace(cfg, batch_size=batch)).items():
            fit_log[f"{prefix}{key}_fit_s"] = dt
        dets.update(det)
    return dets


def idm_section(cfg: BenchmarkConfig, store: Any, dataset: Any, dets: dict[str, Any], split: str) -> dict[str, Any]:
    """IDM per detector on the split and its named subsets, plus the model's ECE / mIoU / accuracy."""
    sets = eval_sets(split, store)
    out: dict[str, Any] = {k: {d: _scalars(r) for d, r in v.items()}
                           for k, v in evaluate_idm_on_sets(store, dataset, dets, cfg, sets).items()}
    cal, _ = evaluate_calibrators_on_sets(store, dataset, {}, cfg, {split: None})
    out["calibration"] = {k: cal[split]["uncalibrated"][k] for k in ("ece", "miou", "accuracy")}
    return out


def _scalars(r: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in r.items() if isinstance(v, float)}


def speed(model: Any, dets: dict[str, Any], image: Any, repeats: int) -> dict[str, Any]:
    """Median wall time (ms) of the ESPNet forward (with features) and of each detector's score, interleaved."""
    out: dict[str, Any] = {}
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {"forward": []}
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                logits, feats = model.predict_batch(image, features=True)
                times["forward"].append(time.perf_counter() - t0)
                for n, d in dets.items():
                    t0 = time.perf_counter()
                    d.score(logits, features=feats) if getattr(d, "needs_features", False) else d.score(logits)
                    times.setdefault(n, []).append(time.perf_counter() - t0)
            med = {n: 1000 * statistics.median(v[1:]) for n, v in times.items()}  # first run = warm-up
            out[f"{threads}t"] = {"ms": med, "overhead": {n: v / med["forward"] for n, v in med.items()}}
    finally:
        torch.set_num_threads(old)
    return out


# ---------------------------------------------------------------------------------------------------- report
def fmt(x: float | None) -> str:
    return "nan" if x is None or x != x else f"{100 * x:.1f}"


def table(rows: dict[str, dict[str, float]], cols: Sequence[tuple[str, str]]) -> str:
    lines = ["| detector | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n, r in rows.items():
        vals = [fmt(r.get(k)) if k.split("_")[0] in PCT else f"{r.get(k, float('nan')):.2f}" for _, k in cols]
        lines.append(f"| {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report(res: dict[str, Any]) -> str:
    parts = []
    per_img = [("AUROC/img", "auroc_per_image"), ("AP/img", "ap_per_image"), ("FPR95/img", "fpr95_per_image"),
               ("AUROC", "auroc"), ("AP", "ap"), ("FPR95", "fpr95")]
    pooled = [("AUROC", "auroc"), ("AP", "ap"), ("FPR95", "fpr95"), ("open-set mIoU", "open_set_miou")]
    for section, title in (("idm_test", "IDM, CamVid test"), ("cityscapes", "Cityscapes model → CamVid test")):
        for k, v in res.get(section, {}).items():
            if k != "calibration":
                parts.append(f"### {title} — {k}\n\n" + table(v, per_img))
    if "ood_pasted" in res:
        parts.append("### OOD, pasted anomalies on CamVid test (pooled)\n\n" + table(res["ood_pasted"], pooled))
    if "shift" in res:
        sh = res["shift"]
        first = next(iter(sh.values()))["0"]
        dets = [k[len("IDM AUROC "):] for k in first if k.startswith("IDM AUROC ")]
        lines = ["| corruption | sev | ECE | mIoU | " + " | ".join(dets) + " |", "|---" * (len(dets) + 4) + "|"]
        rows = [("clean", "0", first)] + [(c, s, p) for c, by_sev in sh.items() for s, p in by_sev.items() if s != "0"]
        for c, s, p in rows:
            lines.append(f"| {c} | {s} | {fmt(p['ECE uncalibrated'])} | {fmt(p['mIoU'])} | "
                         + " | ".join(fmt(p[f"IDM AUROC {d}"]) for d in dets) + " |")
        parts.append("### Domain shift: pooled IDM AUROC (and the model's ECE / mIoU)\n\n" + "\n".join(lines))
    for t, v in res.get("speed", {}).items():
        lines = ["| | ms | × forward |", "|---|---|---|"]
        lines += [f"| {n} | {ms:.1f} | {100 * v['overhead'][n]:.1f} % |" for n, ms in v["ms"].items()]
        parts.append(f"### Inference time, {t} (median)\n\n" + "\n".join(lines))
    if "fit_log" in res:
        parts.append("### Fit log\n\n```\n" + json.dumps(res["fit_log"], indent=1) + "\n```")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="cache", help="logits cache folder (segcal.engine.protocol.cached_store)")
    p.add_argument("--out", default="cache/detection")
    p.add_argument("--quick", action="store_true", help="smoke run: few frames, 1 epoch, 1 corruption")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4, help="FlowEneDet epochs of the library-default rows")
    p.add_argument("--fed-variants", nargs="*", default=list(FED_CONFIGS))
    p.add_argument("--test-frames", type=int, default=None, help="evenly spaced val/test frames (default all)")
    p.add_argument("--anomaly-frames", type=int, default=None, help="evenly spaced test frames (default all)")
    p.add_argument("--shift-frames", type=int, default=40)
    p.add_argument("--corruptions", nargs="*", default=list(SHIFT_CORRUPTIONS))
    p.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--cityscapes-frames", type=int, default=None, help="evenly spaced val/test frames (default all)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: idm ood shift cityscapes speed")
    p.add_argument("--force", nargs="*", default=[], help="sections to recompute")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        a.epochs, a.shift_frames, a.anomaly_frames, a.cityscapes_frames, a.test_frames = 1, 4, 6, 6, 8
        a.corruptions, a.severities, a.repeats = a.corruptions[:1], [3], 3
        a.fed_variants = [v for v in a.fed_variants if v in ("flowenedet-u", "flowenedet-c")]
    out = Path(a.out) / ("quick" if a.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json", a.force)
    cfg = BenchmarkConfig(out=out, cache=Path(a.cache), model="espnet-camvid", n_images=a.test_frames,
                          corruptions=tuple(a.corruptions), severities=tuple(a.severities),
                          n_shift_images=a.shift_frames, bootstrap_resamples=0, progress=False,
                          method_kwargs={n: {"epochs": a.epochs} for n in ("flowenedet-u", "flowenedet-c")})
    model = load_model(cfg, "espnet-camvid")
    val_ds, test_ds = make_dataset(cfg, "val", model.num_classes), make_dataset(cfg, "test", model.num_classes)
    val = cached_store(model, "espnet-camvid", val_ds, "val", cfg, features=True)
    test = cached_store(model, "espnet-camvid", test_ds, "test", cfg, features=True)
    fit_log: dict[str, Any] = {}
    dets = detectors(cfg, val, val_ds, a.fed_variants, fit_log)
    res.put("fit_log", fit_log)
    res.put("config", vars(a))

    if "idm" not in a.skip and not res.done("idm_test"):
        res.put("idm_test", idm_section(cfg, test, test_ds, dets, "test"))
    if "speed" not in a.skip and not res.done("speed"):
        image = test_ds[0]["image"][None]
        res.put("speed", speed(model, {n: d for n, d in dets.items() if n in SHIFT_DETS}, image, a.repeats))
    if "ood" not in a.skip and not res.done("ood_pasted"):
        ood_cfg = dataclasses.replace(cfg, n_shift_images=a.anomaly_frames)
        res.put("ood_pasted", {d: _scalars(r) for d, r in evaluate_anomalies(model, test_ds, dets, ood_cfg).items()})
    if "cityscapes" not in a.skip and not res.done("cityscapes"):
        spec = "espnet-cityscapes"
        ccfg = dataclasses.replace(cfg, model=spec, n_images=a.cityscapes_frames)
        cmodel = load_model(ccfg, spec)
        cval_ds, ctest_ds = make_dataset(ccfg, "val", cmodel.num_classes), make_dataset(ccfg, "test",
                                                                                        cmodel.num_classes)
        features = getattr(cmodel, "feature_channels", None) is not None
        cval = cached_store(cmodel, spec, cval_ds, "val", ccfg, features=features)
        ctest = cached_store(cmodel, spec, ctest_ds, "test", ccfg, features=features)
        cdets = detectors(ccfg, cval, cval_ds, [n for n in a.fed_variants if n in SHIFT_DETS], fit_log,
                          prefix="cityscapes-")
        res.put("fit_log", fit_log)
        res.put("cityscapes", idm_section(ccfg, ctest, ctest_ds, cdets, "test"))
    if "shift" not in a.skip and not res.done("shift"):
        res.put("shift", evaluate_corruptions(model, test_ds, {n: d for n, d in dets.items() if n in SHIFT_DETS},
                                              {}, cfg))

    text = report(res.data)
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
