"""FlowEneDet inference cost relative to the segmenter's forward (issue 14, item 2).

Times, on one 3 x 360 x 480 frame (CamVid size), the ESPNet-CamVid forward (with features, as FED-C needs them)
and ``score`` of the shipped FED-U / FED-C fits at every ``score_stride`` asked for, interleaved round by round;
each entry is the minimum over ``--repeats`` rounds (the machine may be shared: the minimum is the least disturbed
run). Prints the load average (``os.getloadavg()``) before and after, and the ratio score / forward.

The published ESPNet weights are read from ``$SEGCAL_DATA``; without them a randomly initialised ESPNet of the same
architecture is timed (same cost). Quick: about 30 s on a quiet machine.

Usage:
    PYTHONPATH=src SEGCAL_DATA=/work/shared/data .venv/bin/python benchmarks/flowenedet_speed.py
    PYTHONPATH=src .venv/bin/python benchmarks/flowenedet_speed.py --threads 1 2 --strides 1 2 4 --repeats 15
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from segcal.detectors import DETECTORS


def _model():
    from segcal import models

    try:
        return models.load("espnet-camvid"), "published weights"
    except Exception as exc:  # any missing-weights error: time the same architecture
        from segcal.models.pretrained import build_espnet

        return build_espnet("camvid"), f"random weights ({type(exc).__name__})"


def _best(fn, repeats: int) -> float:
    return min(_once(fn) for _ in range(repeats))


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4], help="FlowEneDet score_stride values")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    args = ap.parse_args()

    model, weights = _model()
    net = model.eval()
    x = torch.rand(1, 3, *args.size, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        logits, feats = net.forward_with_features(x)
    dets = {}  # one shipped fit per variant; score_stride is an inference setting, switched between timings
    for variant in ("u", "c"):
        det = DETECTORS.resolve(f"flowenedet-{variant}").pretrained("espnet-camvid")
        for r in args.strides:
            tag = " (default: = downsample)" if r == det.downsample else " (before issue 14)" if r == 1 else ""
            dets[f"FED-{variant.upper()} score_stride={r}{tag}"] = (det, r)

    print(f"ESPNet-CamVid ({weights}), input 1x3x{args.size[0]}x{args.size[1]}, logits {tuple(logits.shape)}, "
          f"features {tuple(feats.shape)}; min over {args.repeats} interleaved rounds")
    print(f"load average before: {os.getloadavg()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {"forward": []}
        with torch.inference_mode():
            for _ in range(2):  # warm-up
                net.forward_with_features(x)
                for det, r in dets.values():
                    det.score_stride = r
                    det.score(logits, feats)
            for _ in range(args.repeats):
                times["forward"].append(_once(lambda: net.forward_with_features(x)))
                for key, (det, r) in dets.items():
                    det.score_stride = r
                    times.setdefault(key, []).append(_once(lambda d=det: d.score(logits, feats)))
        fwd = min(times["forward"])
        print(f"\n{threads} thread(s)   load average now: {os.getloadavg()}")
        print(f"| | ms | / forward |\n|---|---|---|\n| ESPNet forward (with features) | {1e3 * fwd:.1f} | 100 % |")
        for key in dets:
            t = min(times[key])
            print(f"| {key} | {1e3 * t:.1f} | {100 * t / fwd:.1f} % |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
