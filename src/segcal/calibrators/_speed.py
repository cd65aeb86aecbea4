"""Speed check of the calibrators on ESPNet-CamVid-sized synthetic logits: ``python -m segcal.calibrators._speed``.

Times the TS fit on 10.4 Mpx (60 × 12 × 360 × 480) and every calibrator's transform of one 480×360 image, on one
thread. Labels are drawn from softmax(z / 1.7) (Gumbel-max), so TS has a well-defined optimum T ≈ 1.7.
"""

from __future__ import annotations

import time
import warnings

import torch

from segcal.calibrators import ConvergenceWarning, get_calibrator


def main() -> None:
    torch.set_num_threads(1)
    # VS/MS/Dirichlet/ETS are capped at 20 iterations on purpose here (only the transform is timed)
    warnings.simplefilter("ignore", ConvergenceWarning)
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 60, 12, 360, 480
    z = torch.randn(n, c, h, w, generator=g) * 4
    y = (z / 1.7 - torch.empty_like(z).exponential_(generator=g).log()).argmax(1)
    y[:, :20] = 255
    img = torch.rand(1, 3, h, w, generator=g)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        ts = get_calibrator("ts").fit(z, y)
        best = min(best, time.perf_counter() - t)
    print(f"TS fit on {n * h * w / 1e6:.1f} Mpx: {best:.2f} s (best of 3), T = {ts.temperature_:.4f}")
    zs, ys = z[:4], y[:4]
    settings = [("ts", {}), ("vs", {"max_iter": 20}), ("ms", {"max_iter": 20}), ("dirichlet", {"max_iter": 20}),
                ("ets", {"max_iter": 20}), ("histogram", {}), ("isotonic", {}), ("lts", {"epochs": 1}),
                ("selective", {"epochs": 2, "max_pixels": 50_000})]
    for name, kw in settings:
        cal = get_calibrator(name, **kw)
        cal.fit(zs, ys, images=img.expand(4, -1, -1, -1) if cal.needs_images else None)
        x = z[:1]
        cal.transform(x, img)
        t = time.perf_counter()
        for _ in range(3):
            cal.transform(x, img)
        print(f"{name:10s} transform per 480x360 image: {(time.perf_counter() - t) / 3 * 1000:.0f} ms")


if __name__ == "__main__":
    main()
