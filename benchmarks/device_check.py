"""CUDA against CPU for every public class: equal metric states, values within float tolerance, and throughput.

Checks (issue 14 item 4), each on the same inputs on both devices:
  metrics      CalibrationMetrics states (integer counts: equal entries; fixed-point sums: max |diff|) and values,
               DetectionMetrics histograms (must be equal: the same float32 scores give the same bins) and values
  calibrators  every registered calibrator fitted on each device: max |predict_proba diff|
  losses       every registered loss: |value diff| and max |gradient diff|
  detectors    every registered detector fitted / scored on each device: max |score diff|
  throughput   CalibrationMetrics.update and DetectionMetrics.update in Mpx/s on both devices, against the bare
               ``softmax(1).max(1)`` pass (11 x 360 x 480 float32 logits, batches of 4)

Without a CUDA device it prints one line and exits 0. Exit status 1 when a check is outside its tolerance.

Usage:
    .venv/bin/python benchmarks/device_check.py                      # cuda vs cpu (skips without a GPU)
    .venv/bin/python benchmarks/device_check.py --device cpu --quick # the script's own logic, cpu vs cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

C, H, W, BATCH = 11, 360, 480, 4
TOL = {"metric": 1e-5, "calibrator": 1e-3, "loss": 1e-4, "detector": 1e-3}


def _logits(n: int, c: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, max(1, h // 8), max(1, w // 8), generator=g)
    base = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    logits = 6.0 * base + 0.7 * torch.randn(n, c, h, w, generator=g)
    target = base.argmax(1)
    flip = torch.rand(n, h, w, generator=g) < 0.15
    target = torch.where(flip, torch.randint(0, c, (n, h, w), generator=g), target)
    target[:, :2] = 255
    return logits.contiguous(), target


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return float(torch.where(both_nan, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def check_metrics(dev: torch.device, rows: list[dict]) -> None:
    from segcal.metrics import CalibrationMetrics, DetectionMetrics

    logits, target = _logits(2 * BATCH, C, H // 2, W // 2, seed=0)
    for kw in ({}, {"boundary_width": 2}):
        ref, m = CalibrationMetrics(C, **kw), CalibrationMetrics(C, **kw).to(dev)
        for i in range(0, len(logits), BATCH):
            ref.update(logits[i:i + BATCH], target[i:i + BATCH])
            m.update(logits[i:i + BATCH].to(dev), target[i:i + BATCH].to(dev))
        name = "CalibrationMetrics" + ("(boundary)" if kw else "")
        for k in ("bin_count", "bin_correct", "fine_count", "cw_pos", "confmat"):
            a, b = getattr(m, k).cpu(), getattr(ref, k)
            rows.append({"group": "metric", "name": f"{name}.{k}", "diff": float((a != b).sum()),
                         "unit": "entries differing", "ok": int((a - b).abs().sum()) <= max(2, b.sum() * 1e-6)})
        got, want = m.compute(), ref.compute()
        worst = max(_maxdiff(got[k], want[k]) for k in want)
        rows.append({"group": "metric", "name": f"{name} values", "diff": worst, "unit": "max |diff|",
                     "ok": worst <= TOL["metric"]})
    scores = 1.0 - torch.softmax(logits, 1).amax(1)
    positive, valid = logits.argmax(1) != target, target != 255
    for kw in ({}, {"per_image": True}):
        ref, m = DetectionMetrics(**kw), DetectionMetrics(**kw).to(dev)
        ref.update(scores, positive, valid)
        m.update(scores.to(dev), positive.to(dev), valid.to(dev))
        equal = torch.equal(m.hist_pos.cpu(), ref.hist_pos) and torch.equal(m.hist_neg.cpu(), ref.hist_neg)
        got, want = m.compute(), ref.compute()
        worst = max(_maxdiff(got[k], want[k]) for k in want)
        rows.append({"group": "metric", "name": "DetectionMetrics" + ("(per_image)" if kw else ""), "diff": worst,
                     "unit": "max |diff|, hist equal" if equal else "max |diff|, HIST DIFFER",
                     "ok": equal and worst <= 1e-9})


def check_calibrators(dev: torch.device, rows: list[dict], quick: bool) -> None:
    from segcal.calibrators import CALIBRATORS, get_calibrator

    fast = {"lts": {"epochs": 2}, "selective": {"epochs": 2, "max_pixels": 3000, "batch_size": 512},
            "vs": {"max_iter": 20}, "ms": {"max_iter": 20}, "ets": {"max_iter": 20}, "dirichlet": {"max_iter": 20}}
    z, y = _logits(4, 5, 32, 32, seed=1)
    img = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for name in sorted(n for n, cls in CALIBRATORS.items() if cls.__module__.startswith("segcal.")):
        out, secs = [], []
        for d in (torch.device("cpu"), dev):
            torch.manual_seed(0)
            cal = get_calibrator(name, **fast.get(name, {}) if quick or name in ("lts", "selective") else {})
            kw = {"images": img.to(d)} if cal.needs_images else {}
            t0 = time.perf_counter()
            try:
                cal.fit(z.to(d), y.to(d), **kw)
                out.append(cal.predict_proba(z.to(d), **kw))
            except Exception as err:
                rows.append({"group": "calibrator", "name": name, "diff": float("nan"),
                             "unit": f"ERROR on {d}: {type(err).__name__}: {str(err)[:80]}", "ok": False})
                break
            _sync(d)
            secs.append(time.perf_counter() - t0)
        else:
            diff = _maxdiff(out[0], out[1])
            rows.append({"group": "calibrator", "name": name, "diff": diff,
                         "unit": f"max |proba diff|; fit {secs[0]:.2f}s cpu, {secs[1]:.2f}s {dev.type}",
                         "ok": diff <= TOL["calibrator"]})


def check_losses(dev: torch.device, rows: list[dict]) -> None:
    from segcal.losses import LOSSES, get_loss

    z, y = _logits(2, 5, 32, 32, seed=3)
    for name in sorted(LOSSES):
        vals, grads = [], []
        for d in (torch.device("cpu"), dev):
            loss = get_loss(name, **({"warmup_epochs": 0, "multiclass": True} if name == "aslp" else {})).to(d)
            kw = {}
            if getattr(loss, "needs_ids", False):
                loss.on_epoch_start(0, val_accuracy=0.9)
                kw = {"ids": ["a", "b"]}
            zd = z.to(d).requires_grad_(True)
            try:
                v = loss(zd, y.to(d), **kw)
                v.backward()
            except Exception as err:
                rows.append({"group": "loss", "name": name, "diff": float("nan"),
                             "unit": f"ERROR on {d}: {type(err).__name__}: {str(err)[:80]}", "ok": False})
                break
            vals.append(v.detach())
            grads.append(zd.grad)
        else:
            dv, dg = _maxdiff(vals[0], vals[1]), _maxdiff(grads[0], grads[1])
            rows.append({"group": "loss", "name": name, "diff": max(dv, dg),
                         "unit": f"|value diff| {dv:.1e}, max |grad diff| {dg:.1e}", "ok": max(dv, dg) <= TOL["loss"]})


def check_detectors(dev: torch.device, rows: list[dict]) -> None:
    from segcal.calibrators import get_calibrator
    from segcal.detectors import DETECTORS, get_detector

    z, y = _logits(4, 5, 32, 32, seed=4)
    f = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    for name in sorted(n for n, cls in DETECTORS.items() if cls.__module__.startswith("segcal.")):
        out = []
        for d in (torch.device("cpu"), dev):
            torch.manual_seed(0)
            kw: dict = {"epochs": 1, "warmup_steps": 1} if name.startswith("flowenedet") else {}
            if name == "selective":
                kw["calibrator"] = get_calibrator("selective", epochs=2, max_pixels=3000, batch_size=512)
            try:
                det = get_detector(name, **kw)
                det.fit([{"logits": z[i:i + 2].to(d), "target": y[i:i + 2].to(d), "features": f[i:i + 2].to(d)}
                         for i in range(0, 4, 2)])
                out.append(det.score(z.to(d), features=f.to(d) if det.needs_features else None))
            except Exception as err:
                rows.append({"group": "detector", "name": name, "diff": float("nan"),
                             "unit": f"ERROR on {d}: {type(err).__name__}: {str(err)[:80]}", "ok": False})
                break
        else:
            diff = _maxdiff(out[0], out[1])
            rows.append({"group": "detector", "name": name, "diff": diff, "unit": "max |score diff|",
                         "ok": diff <= TOL["detector"]})


def throughput(dev: torch.device, rows: list[dict], repeats: int) -> None:
    from segcal.metrics import CalibrationMetrics, DetectionMetrics

    logits, target = _logits(BATCH, C, H, W, seed=6)
    mpx = BATCH * H * W / 1e6
    for d in (torch.device("cpu"), dev):
        x, t = logits.to(d), target.to(d)
        s = (1.0 - torch.softmax(x, 1).amax(1))
        pos, valid = x.argmax(1) != t, t != 255
        cal, det = CalibrationMetrics(C).to(d), DetectionMetrics().to(d)
        runs = {"softmax+max": lambda x=x: torch.softmax(x, 1).max(1),
                "CalibrationMetrics.update": lambda x=x, t=t, cal=cal: cal.update(x, t),
                "DetectionMetrics.update": lambda s=s, pos=pos, valid=valid, det=det: det.update(s, pos, valid)}
        for name, fn in runs.items():
            fn()  # warm-up (CUDA context, allocator, kernels)
            _sync(d)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                _sync(d)
                best = min(best, time.perf_counter() - t0)
            rows.append({"group": "throughput", "name": f"{name} [{d.type}]", "diff": mpx / best,
                         "unit": f"Mpx/s (best of {repeats}, {torch.get_num_threads()} threads)", "ok": True})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="device to compare with the CPU (default cuda)")
    ap.add_argument("--quick", action="store_true", help="fewer optimiser steps for calibrators")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"device_check: skipped, no CUDA device (torch {torch.__version__})")
        return 0
    rows: list[dict] = []
    t0 = time.perf_counter()
    check_metrics(dev, rows)
    check_losses(dev, rows)
    check_detectors(dev, rows)
    check_calibrators(dev, rows, args.quick)
    throughput(dev, rows, args.repeats)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device_check: {dev} ({name}) vs cpu, torch {torch.__version__}, {time.perf_counter() - t0:.0f}s\n")
    print("| group | check | value | what | ok |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['name']} | {r['diff']:.3g} | {r['unit']} | {'yes' if r['ok'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    bad = [r["name"] for r in rows if not r["ok"]]
    if bad:
        print(f"\n{len(bad)} check(s) outside tolerance: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
