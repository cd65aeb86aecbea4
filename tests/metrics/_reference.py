"""Float64 reference implementations written directly from the definitions in design.md (slow, loop-based)."""

from __future__ import annotations

import numpy as np
import torch


def flatten_valid(preds: torch.Tensor, target: torch.Tensor, ignore_index=255, input="logits", exclude=()):
    """(P, C) float64 probabilities and (P,) labels of the valid pixels."""
    x = preds.double()
    p = torch.softmax(x, 1) if input == "logits" else x
    c = p.shape[1]
    p = p.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    y = target.reshape(-1).numpy().astype(np.int64)
    keep = y != ignore_index if ignore_index is not None else np.ones_like(y, dtype=bool)
    for k in exclude:
        keep &= y != k
    return p[keep], y[keep]


def bin_of(c: np.ndarray, n: int) -> np.ndarray:
    """Bin b holds c in (b/n, (b+1)/n]; c = 0 -> bin 0."""
    return np.clip(np.ceil(c * n).astype(np.int64) - 1, 0, n - 1)


def ece_terms(conf: np.ndarray, correct: np.ndarray, n: int) -> dict:
    b = bin_of(conf, n)
    tot = len(conf)
    ece = mce = oe = 0.0
    for i in range(n):
        s = b == i
        if not s.any():
            continue
        acc, cf = correct[s].mean(), conf[s].mean()
        ece += s.sum() / tot * abs(acc - cf)
        mce = max(mce, abs(acc - cf))
        oe += s.sum() / tot * cf * max(cf - acc, 0.0)
    return {"ece": ece, "mce": mce, "oe": oe, "accuracy": correct.mean()}


def ace_sorted(conf: np.ndarray, correct: np.ndarray, n: int) -> float:
    """Equal-mass bins over sorted confidences; fractional split when len is not divisible by n."""
    order = np.argsort(conf, kind="stable")
    x = (correct.astype(np.float64) - conf)[order]
    cum = np.concatenate([[0.0], np.cumsum(x)])
    pos = np.arange(n + 1) * len(x) / n
    f = np.interp(pos, np.arange(len(x) + 1), cum)
    return float(np.abs(np.diff(f)).sum() / len(x))


def reference(preds, target, n_bins=15, ignore_index=255, input="logits", exclude=()):
    p, y = flatten_valid(preds, target, ignore_index, input, exclude)
    num_c = p.shape[1]
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(np.float64)
    out = ece_terms(conf, correct, n_bins)
    out["ace"] = ace_sorted(conf, correct, n_bins)
    per = []
    for k in range(num_c):
        pk, yk = p[:, k], (y == k).astype(np.float64)
        b = bin_of(pk, n_bins)
        per.append(sum(abs(yk[b == i].sum() - pk[b == i].sum()) for i in range(n_bins)) / len(y))
    keep = [k for k in range(num_c) if k not in exclude]
    out["cw_ece"] = float(np.mean([per[k] for k in keep]))
    py = p[np.arange(len(y)), y]
    out["nll"] = float(-np.log(py).mean())
    onehot = np.eye(num_c)[y]
    out["brier"] = float(((p - onehot) ** 2).sum(1).mean())
    ious = []
    for k in keep:
        inter = ((pred == k) & (y == k)).sum()
        union = ((pred == k) | (y == k)).sum()
        if union:
            ious.append(inter / union)
    out["miou"] = float(np.mean(ious))
    # per-image ECE
    eces = []
    for i in range(preds.shape[0]):
        pi, yi = flatten_valid(preds[i:i + 1], target[i:i + 1], ignore_index, input, exclude)
        if len(yi):
            eces.append(ece_terms(pi.max(1), (pi.argmax(1) == yi).astype(np.float64), n_bins)["ece"])
    out["image_ece"] = float(np.mean(eces))
    return out


def boundary_reference(target: np.ndarray, k: int, ignore_index=255) -> np.ndarray:
    """Brute force: a valid pixel is boundary if a valid pixel within Chebyshev distance k has another label."""
    n, h, w = target.shape
    out = np.zeros_like(target, dtype=bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = target[b, i, j]
                if y == ignore_index:
                    continue
                win = target[b, max(0, i - k):i + k + 1, max(0, j - k):j + k + 1]
                out[b, i, j] = bool(((win != ignore_index) & (win != y)).any())
    return out


def realistic_logits(n, c, h, w, seed=0, scale=4.0):
    """Smooth, confident logits and a label map that the argmax gets mostly right."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, max(2, h // 8), max(2, w // 8), generator=g)
    base = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    logits = scale * base + 0.7 * torch.randn(n, c, h, w, generator=g)
    target = base.argmax(1)
    flip = torch.rand(n, h, w, generator=g) < 0.15
    target = torch.where(flip, torch.randint(0, c, (n, h, w), generator=g), target)
    return logits, target
