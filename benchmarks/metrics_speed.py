"""Throughput and peak memory of segcal's streaming metric suite against the anchors.

Methods, each fed N images of realistic 11 x 360 x 480 float32 logits in batches of 4:
  softmax+max   bare ``softmax(1).max(1)`` pass: the floor every metric pays
  segcal        ``CalibrationMetrics`` full suite (ece, mce, ace, cw_ece, nll, brier, oe, miou, image_ece), as
                shipped: the fused C++ kernels (built before the timed region, cached in ~/.cache/segcal/ext)
  segcal-torch  the same with ``SEGCAL_FUSED=0``: the pure-PyTorch twins (the CUDA / no-compiler path; states
                bit-identical to ``segcal``)
  segcal-no-cw  ``segcal`` with ``classwise=False`` (everything but cw_ece)
  tm-probs      torchmetrics ``MulticlassCalibrationError`` (ECE only; keeps every pixel's confidence) fed
                PROBABILITIES, as its docs use it: the softmax is computed before the timed region, so the anchor
                gets them for free (the strictest comparison for segcal, which takes logits)
  tm-logits     the same fed logits (its slow path: a range check and a softmax inside ``update``)
  netcal        ``netcal.metrics.ECE`` (needs all (P, C) probabilities at once)

Each (method, N) runs in its own subprocess so the peak RSS (``ru_maxrss``) is that method's alone; inputs are a
fixed pool of 4 distinct batches cycled to make N images, so input memory is the same for every N.

The whole table (every method at 1 and 2 threads) comes from one run; the load average before and after is printed
with it. ``--rounds R`` repeats the whole sweep R times and keeps each cell's best: a shared or virtual machine's
speed drifts by tens of percent over minutes, and interleaved rounds keep that drift out of the ratios. Run it on a
quiet machine (nothing else running).

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/metrics_speed.py                     # N = 8, 32; 1 and 2 threads
    PYTHONPATH=src .venv/bin/python benchmarks/metrics_speed.py --n 16 64 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

C, H, W, BATCH, POOL = 11, 360, 480, 4, 4
METHODS = ["softmax+max", "segcal", "segcal-torch", "segcal-no-cw", "tm-probs", "tm-logits", "netcal"]


def _pool(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(POOL):
        base = torch.randn(BATCH, C, H // 8, W // 8, generator=g)
        base = torch.nn.functional.interpolate(base, size=(H, W), mode="bilinear", align_corners=False)
        logits = 6.0 * base + 0.7 * torch.randn(BATCH, C, H, W, generator=g)
        target = base.argmax(1)
        flip = torch.rand(BATCH, H, W, generator=g) < 0.15
        target = torch.where(flip, torch.randint(0, C, (BATCH, H, W), generator=g), target)
        target[:, :8] = 255  # a void band, as in CamVid
        out.append((logits.contiguous(), target))
    return out


def _run_once(method: str, pool, n_images: int) -> float:
    import numpy as np
    import torch

    batches = [pool[i % POOL] for i in range(n_images // BATCH)]
    if method == "tm-probs":  # probabilities are the anchor's documented input; made outside the timed region
        batches = [(torch.softmax(logits, 1), target) for logits, target in batches]
    t0 = time.perf_counter()
    if method == "softmax+max":
        for logits, _ in batches:
            torch.softmax(logits, 1).max(1)
    elif method in ("segcal", "segcal-torch", "segcal-no-cw"):
        from segcal.metrics import CalibrationMetrics

        m = CalibrationMetrics(C, classwise=method != "segcal-no-cw")
        for logits, target in batches:
            m.update(logits, target)
        m.compute()
    elif method in ("tm-probs", "tm-logits"):
        from torchmetrics.classification import MulticlassCalibrationError

        m = MulticlassCalibrationError(num_classes=C, n_bins=15, ignore_index=255)
        for logits, target in batches:
            m.update(logits, target)
        m.compute()
    elif method == "netcal":
        from netcal.metrics import ECE

        probs, labels = [], []
        for logits, target in batches:
            p = torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, C)
            y = target.reshape(-1)
            keep = y != 255
            probs.append(p[keep].numpy())
            labels.append(y[keep].numpy())
        ECE(bins=15).measure(np.concatenate(probs), np.concatenate(labels))
    else:
        raise ValueError(method)
    return time.perf_counter() - t0


def _child(method: str, n_images: int, repeats: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["SEGCAL_FUSED"] = "0" if method == "segcal-torch" else "1"
    if method in ("segcal", "segcal-no-cw"):
        from segcal.metrics import _fused

        if not _fused.available():
            raise SystemExit(f"{method}: the fused kernels could not be built (no C++ compiler?)")
    import netcal.metrics  # noqa: F401  (imports outside the timed region)
    import torchmetrics.classification  # noqa: F401

    import segcal.metrics  # noqa: F401

    pool = _pool()
    _run_once(method, pool[:1], BATCH)  # warm-up: first-call allocations and lazy initialisation
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = min(_run_once(method, pool, n_images) for _ in range(repeats))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": method, "n": n_images, "seconds": best,
                      "peak_mb": peak / 1024, "extra_mb": (peak - base_rss) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32], help="numbers of images (multiples of 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process (best kept)")
    ap.add_argument("--rounds", type=int, default=2, help="sweeps over every cell (best kept)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch thread counts; every method runs at each, in one run")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.repeats, args.threads[0])
        return
    import torch

    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; images {C}x{H}x{W} float32, batches of {BATCH}, "
          f"best of {args.repeats} runs x {args.rounds} rounds; load average before: "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    rows: dict = {}
    for _ in range(args.rounds):
        for t in args.threads:
            for n in args.n:
                for method in args.methods:
                    res = subprocess.run([sys.executable, __file__, "--child", method, str(n), "--repeats",
                                          str(args.repeats), "--threads", str(t)],
                                         capture_output=True, text=True, check=True)
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    r["mpx_s"] = n * H * W / r["seconds"] / 1e6
                    best = rows.get((t, method, n))
                    if best is None or r["seconds"] < best["seconds"]:
                        rows[(t, method, n)] = r
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"{'thr':>3} {'method':<14}{'N':>5}{'Mpx':>7}{'Mpx/s':>9}{'vs softmax':>12}{'vs tm probs':>13}"
          f"{'vs tm logits':>14}{'peak MB':>10}{'extra MB':>10}")
    for t in args.threads:
        for n in args.n:
            for method in args.methods:
                r = rows[(t, method, n)]

                def ratio(ref: str, r: dict = r, t: int = t, n: int = n) -> str:
                    base = rows.get((t, ref, n))
                    return f"{r['mpx_s'] / base['mpx_s']:.2f}x" if base else "-"

                print(f"{t:>3} {method:<14}{n:>5}{n * H * W / 1e6:>7.1f}{r['mpx_s']:>9.2f}"
                      f"{ratio('softmax+max'):>12}{ratio('tm-probs'):>13}{ratio('tm-logits'):>14}"
                      f"{r['peak_mb']:>10.0f}{r['extra_mb']:>10.0f}")


if __name__ == "__main__":
    main()
