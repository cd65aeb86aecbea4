"""Full-split quality of the published ESPNet weights on CamVid (needs SEGCAL_DATA).

Rows: CamVid model on val, test, and test per sequence (0001TP = dusk, Seq05VD = unseen); Cityscapes model on CamVid
test with classes merged (a domain shift). Columns: mIoU, pixel accuracy, NLL, top-label ECE (15 equal-width bins,
pooled over pixels), misclassification AUROC of the max-softmax probability. Void pixels are ignored everywhere.

Metrics come from a small local streaming helper (confusion matrix + 15-bin and 2000-bin confidence histograms), so the
script does not depend on segcal.metrics; ``--check`` cross-checks against ``segcal.metrics.CalibrationMetrics`` when
that is available.

Usage::

    SEGCAL_DATA=/path/to/data python benchmarks/espnet_quality.py [--limit N] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from segcal.data import CamVid, sequence_of
from segcal.models import load

N_BINS = 15
FINE = 2000


class Stats:
    """Streaming sufficient statistics for mIoU / accuracy / NLL / ECE / AUROC over valid pixels."""

    def __init__(self, c: int) -> None:
        self.conf = np.zeros((c, c), np.int64)
        self.nll = 0.0
        self.cnt = np.zeros(N_BINS)
        self.csum = np.zeros(N_BINS)
        self.acc = np.zeros(N_BINS)
        self.fine_ok = np.zeros(FINE)
        self.fine_err = np.zeros(FINE)

    def update(self, logits: torch.Tensor, target: np.ndarray) -> None:
        c = logits.shape[0]
        t = torch.from_numpy(target)
        valid = t != 255
        logp = torch.log_softmax(logits.double(), 0)
        conf, pred = logp.max(0)
        conf = conf.exp()[valid]
        pred, y = pred[valid], t[valid]
        self.nll -= float(logp.gather(0, t.clamp(0, c - 1)[None])[0][valid].sum())
        self.conf += np.bincount((y * c + pred).numpy(), minlength=c * c).reshape(c, c)
        ok = (pred == y).double()
        b = (conf * N_BINS).ceil().long().clamp(1, N_BINS) - 1  # bin b holds (b/n, (b+1)/n], 0 -> bin 0
        self.cnt += np.bincount(b.numpy(), minlength=N_BINS)
        self.csum += np.bincount(b.numpy(), weights=conf.numpy(), minlength=N_BINS)
        self.acc += np.bincount(b.numpy(), weights=ok.numpy(), minlength=N_BINS)
        f = (conf * FINE).long().clamp(0, FINE - 1).numpy()
        okb = ok.bool().numpy()
        self.fine_ok += np.bincount(f[okb], minlength=FINE)
        self.fine_err += np.bincount(f[~okb], minlength=FINE)

    def compute(self) -> dict:
        n = self.conf.sum()
        inter = np.diag(self.conf)
        union = self.conf.sum(0) + self.conf.sum(1) - inter
        iou = inter[union > 0] / union[union > 0]
        nz = self.cnt > 0
        ece = float(np.sum(np.abs(self.acc[nz] - self.csum[nz])) / n)
        # AUROC of the score "1 - confidence" for the event "error": P(score_err > score_ok) with ties at 1/2.
        err_low_conf = self.fine_err
        ok_cum_above = np.cumsum(self.fine_ok[::-1])[::-1] - self.fine_ok  # ok pixels with strictly higher conf
        auroc = float((err_low_conf * (ok_cum_above + 0.5 * self.fine_ok)).sum()
                      / max(self.fine_err.sum() * self.fine_ok.sum(), 1))
        return {"miou": 100 * iou.mean(), "acc": 100 * inter.sum() / n, "nll": self.nll / n, "ece": 100 * ece,
                "auroc": auroc}


def run(model_name: str, split: str, limit: int | None, check: bool) -> dict[str, dict]:
    model = load(model_name)
    ds = CamVid(split=split)
    names = ds.names[:limit] if limit else ds.names
    groups = {"all": Stats(11)}
    ref = None
    if check:
        try:
            from segcal.metrics import CalibrationMetrics

            ref = CalibrationMetrics(11, n_bins=N_BINS)
        except ImportError:
            print("segcal.metrics.CalibrationMetrics not available: skipping --check")
    for name in names:
        s = {"image": ds.load_image(name), "target": ds.load_target(name)}
        logits = model.predict_logits(s["image"])
        groups["all"].update(logits, s["target"])
        seq = sequence_of(name)
        if split == "test":
            groups.setdefault(seq, Stats(11)).update(logits, s["target"])
        if ref is not None:
            ref.update(logits[None], torch.from_numpy(s["target"])[None])
    out = {k: v.compute() for k, v in groups.items()}
    if ref is not None:
        r = ref.compute()
        print(f"  check vs CalibrationMetrics: ece {100 * float(r['ece']):.2f}, nll {float(r['nll']):.3f}, "
              f"miou {100 * float(r['miou']):.1f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N images per split (quick look)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="cross-check with segcal.metrics if available")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    t0 = time.time()
    for model_name, split in [("espnet-camvid", "val"), ("espnet-camvid", "test"), ("espnet-cityscapes", "test")]:
        res = run(model_name, split, args.limit, args.check)
        for group, m in res.items():
            label = f"{split}" if group == "all" else f"{split}, {group}"
            rows.append((model_name, label, m))
        print(f"  done {model_name} on {split} ({time.time() - t0:.0f} s)", flush=True)
    print()
    print("| model | CamVid split | mIoU | pixel acc. | NLL | ECE(15) % | MSP error AUROC |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model_name, label, m in rows:
        print(f"| {model_name} | {label} | {m['miou']:.1f} | {m['acc']:.1f} | {m['nll']:.3f} | {m['ece']:.1f} | "
              f"{m['auroc']:.3f} |")


if __name__ == "__main__":
    main()
