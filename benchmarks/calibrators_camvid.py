"""Post-hoc calibrators on real ESPNet logits, with the Selective-Scaling analysis (issue 7, "Show").

A configuration of ``segcal.engine.protocol``: this file holds the study (splits, grids, selection rule, tables);
every fit and metric is the library's (``fit_calibrators``, ``evaluate_calibrators_on_sets``,
``evaluate_idm_on_sets``).

Usage:
    SEGCAL_DATA=/work/shared/data nice -n 5 .venv/bin/python benchmarks/calibrators_camvid.py --cache /work/cache \\
        [--out cache/calibrators] [--quick] [--models espnet-camvid,espnet-cityscapes] [--test-stride 6] \\
        [--max-pixels 300000] [--lts-epochs 1] [--epochs 40] [--thresholds 0.3 0.5] [--t-mis fit 1000]

Protocols (every calibrator; ECE with 15 bins):

1. **In-domain** (the paper's): CamVid val is split **by image** with a fixed seed into fit / select / held-out
   (50 / 20 / 30 %). Calibrators are fitted on *fit*; hyperparameters (Dirichlet ODIR λ, histogram bins, Selective
   threshold × base × T_mis) are chosen on *select* by 15-bin ECE; results on *held-out*.
2. **Shift**: the chosen hyperparameters are refitted on **all of val** and evaluated on CamVid test (every
   ``--test-stride``-th frame), pooled and per named subset of the dataset (``Seq05VD`` — unseen — and ``0001TP`` —
   dusk), and for the Cityscapes model → CamVid case. Nothing is tuned on test; the "oracle T" (TS fitted on each
   test set) is a diagnostic only.

Selective detectors (``SelectiveDetector`` around each fitted Selective calibrator) and MSP are scored as
misprediction detectors (AUROC / AP / FPR95) on held-out and test. Results: ``<out>/results.json`` and Markdown tables
in ``<out>/tables.md`` (also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from segcal.detectors import DETECTORS
from segcal.engine.evaluate import to_jsonable
from segcal.engine.protocol import (
    BenchmarkConfig,
    build_method,
    cached_store,
    evaluate_calibrators_on_sets,
    evaluate_idm_on_sets,
    fit_calibrators,
    load_model,
    make_dataset,
)

METRICS = ("ece", "mce", "ace", "cw_ece", "nll", "brier", "miou", "boundary_ece", "interior_ece", "ece_correct",
           "ece_wrong")


def baseline_grid(max_pixels: int, lts_epochs: int) -> dict[str, list[tuple[str, str, dict]]]:
    """family → grid of (label, registry name, kwargs); grids with > 1 point are chosen on select."""
    mp = {"max_pixels": max_pixels, "seed": 0}
    return {
        "ts": [("ts", "ts", {})],
        "vs": [("vs", "vs", mp)],
        "ms": [("ms", "ms", mp)],
        "dirichlet": [(f"dirichlet-l{lam:g}", "dirichlet", {"reg_lambda": lam, **mp}) for lam in (0.0, 1e-2)],
        "ets": [("ets", "ets", mp)],
        "lts": [("lts", "lts", {"epochs": lts_epochs})],
        "histogram": [(f"histogram-b{b}", "histogram", {"n_bins": b}) for b in (10, 15, 30)],
        "isotonic": [("isotonic", "isotonic", {})],
    }


def selective_grid(thresholds: list[float], t_mis: list[str], epochs: int) -> list[tuple[str, str, dict]]:
    out = []
    for base in (None, "ts"):
        for t in thresholds:
            for m in t_mis:
                lab = f"sel-{base or 'id'}-t{t:g}-T{m}"
                out.append((lab, "selective", {"base": base, "threshold": t, "epochs": epochs,
                                               "mis_temperature": m if m == "fit" else float(m)}))
    return out


def split_val(names: list[str], seed: int, fracs: tuple[float, float]) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    perm = sorted(names)
    rng.shuffle(perm)
    n_fit, n_sel = round(fracs[0] * len(perm)), round(fracs[1] * len(perm))
    return sorted(perm[:n_fit]), sorted(perm[n_fit:n_fit + n_sel]), sorted(perm[n_fit + n_sel:])


def fit_grid(points: list[tuple[str, str, dict]], store: Any, dataset: Any, cfg: BenchmarkConfig,
             images: list[str] | None, times: dict[str, float]) -> dict[str, Any]:
    """Fit every grid point (label → fitted calibrator) on ``images`` of ``store``."""
    out = {}
    for label, name, kwargs in points:
        fitted, dt = fit_calibrators([name], store, dataset, dataclasses.replace(cfg, method_kwargs={name: kwargs}),
                                     images=images)
        out[label], times[label] = fitted[name], dt[name]
        print(f"  fit {label}: {dt[name]:.1f}s", flush=True)
    return out


def selective_detectors(cals: dict[str, Any], ignore_index: int | None) -> dict[str, Any]:
    dets = {"msp (uncal)": build_method(DETECTORS, "msp", ignore_index)}
    for label, cal in cals.items():
        if label.startswith("sel-"):
            dets[label] = build_method(DETECTORS, "selective", ignore_index, {"calibrator": cal})
    return dets


def study(cfg: BenchmarkConfig, spec: str, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    model = load_model(cfg, spec)
    val_ds, test_ds = make_dataset(cfg, "val", model.num_classes), make_dataset(cfg, "test", model.num_classes)
    vstore = cached_store(model, spec, val_ds, "val", cfg)
    tstore = cached_store(model, spec, test_ds, "test", cfg)
    vnames = sorted(vstore.names)[::6] if quick else sorted(vstore.names)
    fit_n, sel_n, held_n = split_val(vnames, args.seed, (0.5, 0.2))
    tnames = sorted(tstore.names)[::args.test_stride]
    kept = set(tnames)
    test_sets: dict[str, list[str] | None] = {"all": tnames}
    for sub, names in (getattr(tstore, "subsets", None) or {}).items():
        if [n for n in names if n in kept]:
            test_sets[sub] = [n for n in names if n in kept]
    res: dict[str, Any] = {"split": {"fit": fit_n, "select": sel_n, "held_out": held_n}, "test_images": len(tnames)}
    grid = baseline_grid(args.max_pixels, args.lts_epochs)
    families = [f for f in grid if args.families is None or f in args.families]
    sgrid = selective_grid(args.thresholds, args.t_mis, args.epochs)

    # ---------------- protocol 1: in-domain
    print(f"=== {spec}: in-domain, fitting on {len(fit_n)} val images", flush=True)
    times: dict[str, float] = {}
    points = [p for f in families for p in grid[f]] + sgrid
    cands = fit_grid(points, vstore, val_ds, cfg, fit_n, times)
    select, _ = evaluate_calibrators_on_sets(vstore, val_ds, cands, cfg, {"select": sel_n})
    ece = {label: r["ece"] for label, r in select["select"].items()}
    chosen = {f: min((lab for lab, _, _ in grid[f]), key=ece.__getitem__) for f in families}
    sel_labels = [lab for lab, _, _ in sgrid]
    chosen["selective"] = min(sel_labels, key=ece.__getitem__)
    for base in ("id", "ts"):
        chosen[f"selective-{base}"] = min((lab for lab in sel_labels if f"-{base}-" in lab), key=ece.__getitem__)
    print(f"  chosen on select: {chosen}", flush=True)
    report = {f: cands[chosen[f]] for f in families}
    report.update({lab: cands[lab] for lab in dict.fromkeys(sel_labels)})
    held, _ = evaluate_calibrators_on_sets(vstore, val_ds, report, cfg, {"held_out": held_n})
    det_held = evaluate_idm_on_sets(vstore, val_ds, selective_detectors(report, vstore.ignore_index), cfg,
                                    {"held_out": held_n})
    res["in_domain"] = {"chosen": chosen, "select": ece, "held_out": held["held_out"],
                        "detection": _scalars(det_held["held_out"]), "fit_time": times, "params": _params(report)}

    # ---------------- protocol 2: shift (fit on all of val with the chosen hyperparameters)
    print(f"=== {spec}: shift, fitting on all {len(vnames)} val images", flush=True)
    by_label = {lab: (lab, name, kw) for f in families for lab, name, kw in grid[f]} | {p[0]: p for p in sgrid}
    shift_points = [by_label[chosen[f]] for f in families]
    shift_points += [by_label[lab] for lab in dict.fromkeys(
        [chosen["selective"], chosen["selective-id"], chosen["selective-ts"], *sel_labels[:1]])]
    shift_times: dict[str, float] = {}
    fitted = fit_grid(shift_points, vstore, val_ds, cfg, vnames, shift_times)
    shift = {f: fitted[chosen[f]] for f in families} | {lab: c for lab, c in fitted.items() if lab.startswith("sel-")}
    print(f"  evaluating on test ({len(tnames)} images, stride {args.test_stride})", flush=True)
    test, _ = evaluate_calibrators_on_sets(tstore, test_ds, shift, cfg, test_sets)
    det_test = evaluate_idm_on_sets(tstore, test_ds, selective_detectors(shift, tstore.ignore_index), cfg, test_sets)
    oracle = {g: float(fit_calibrators(["ts"], tstore, test_ds, cfg, images=ns)[0]["ts"].temperature_)
              for g, ns in test_sets.items()}
    res["shift"] = {"test": test, "detection": {g: _scalars(v) for g, v in det_test.items()},
                    "fit_time": shift_times, "params": _params(shift), "oracle_T_test": oracle}
    return res


def _scalars(dets: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {d: {k: v for k, v in r.items() if isinstance(v, float)} for d, r in dets.items()}


def _params(methods: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, m in methods.items():
        p: dict[str, Any] = {}
        for attr, key in (("temperature_", "T"), ("temperature_mis_", "T_mis"), ("best_epoch_", "best_epoch")):
            if hasattr(m, attr):
                p[key] = float(getattr(m, attr))
        base = getattr(m, "base_", None)
        if base is not None and hasattr(base, "temperature_"):
            p["base_T"] = float(base.temperature_)
        out[k] = p
    return out


# ---------------------------------------------------------------------------------------------------- tables
def _f(v: Any, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}"


HDR = ("| method | ECE | MCE | ACE | CW-ECE | NLL | Brier | mIoU | bnd ECE | int ECE | ECE corr | ECE mis | fit s |\n"
       + "|" + "---|" * 13)
DHDR = "| detector | AUROC | AP | FPR95 | T_mis | base T |\n|---|---|---|---|---|---|"


def _row(name: str, r: dict, t: float | None) -> str:
    vals = [_f(r.get(k)) for k in ("ece", "mce", "ace", "cw_ece", "nll", "brier")]
    vals += [_f(100 * r["miou"], 2) if "miou" in r else "–", _f(r.get("boundary_ece")), _f(r.get("interior_ece")),
             _f(r.get("ece_correct")), _f(r.get("ece_wrong")), _f(t, 1) if t is not None else "–"]
    return f"| {name} | " + " | ".join(vals) + " |"


def _det_rows(dets: dict[str, dict], params: dict[str, Any]) -> list[str]:
    return [f"| {d} | {_f(r.get('auroc'))} | {_f(r.get('ap'))} | {_f(r.get('fpr95'))} | "
            f"{_f(params.get(d, {}).get('T_mis'), 3)} | {_f(params.get(d, {}).get('base_T'), 3)} |"
            for d, r in dets.items()]


def tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for model, res in results["protocols"].items():
        ind, sp = res["in_domain"], res["split"]
        ch = ind["chosen"]
        lines += [f"\n### {model} — in-domain (fit {len(sp['fit'])} / select {len(sp['select'])} / held-out "
                  f"{len(sp['held_out'])} val images)\n", HDR]
        for name, r in ind["held_out"].items():
            lab = ch.get(name, name)
            star = " ★" if name == ch["selective"] else ""
            lines.append(_row(f"{name}{f' ({lab})' if lab != name else ''}{star}", r, ind["fit_time"].get(lab)))
        lines += ["", "Misprediction detection on held-out (Selective detectors vs MSP):\n", DHDR]
        lines += _det_rows(ind["detection"], ind["params"])
        sh = res["shift"]
        for g, methods in sh["test"].items():
            lines += [f"\n### {model} — shift: fit on all val, test `{g}` ({res['test_images']} test images total)\n",
                      HDR]
            for name, r in methods.items():
                lab = ch.get(name, name)
                lines.append(_row(f"{name}{f' ({lab})' if lab != name else ''}", r, sh["fit_time"].get(lab)))
            lines += ["", f"Misprediction detection on test `{g}`:\n", DHDR]
            lines += _det_rows(sh["detection"][g], sh["params"])
        lines.append("\nOracle TS temperature on each test set (diagnostic, never used for a choice): "
                     + ", ".join(f"{g}: {t:.3f}" for g, t in sh["oracle_T_test"].items())
                     + f"; TS fitted on val: {_f(sh['params'].get('ts', {}).get('T'), 3)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("cache"), help="logits cache folder")
    ap.add_argument("--out", type=Path, default=Path("cache/calibrators"))
    ap.add_argument("--quick", action="store_true", help="smoke run: every 6th val image, every 40th test image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="espnet-camvid,espnet-cityscapes")
    ap.add_argument("--families", nargs="*", default=None, help="baseline families (default all)")
    ap.add_argument("--test-stride", type=int, default=6)
    ap.add_argument("--max-pixels", type=int, default=300_000)
    ap.add_argument("--lts-epochs", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=40, help="Selective detector epochs")
    ap.add_argument("--thresholds", nargs="*", type=float, default=[0.3, 0.5])
    ap.add_argument("--t-mis", nargs="*", default=["fit", "1000"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.test_stride, args.lts_epochs, args.epochs, args.thresholds, args.t_mis = 40, 1, 2, [0.5], ["fit"]
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = BenchmarkConfig(out=out, cache=args.cache, bootstrap_resamples=0, progress=False, seed=args.seed)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "protocols": {}}
    t0 = time.time()
    for spec in args.models.split(","):
        results["protocols"][spec] = study(cfg, spec, args, args.quick)
        (out / f"results-{spec}.json").write_text(json.dumps(to_jsonable(results["protocols"][spec]), indent=1))
        print(f"  done {spec} ({time.time() - t0:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(to_jsonable(results), indent=1))
    md = tables(results)
    (out / "tables.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("SEGCAL_DATA", "/work/shared/data")
    sys.exit(main())
