"""Speed of the calibration losses relative to cross-entropy (forward + backward), alone and in an ESPNet step.

Usage:
    .venv/bin/python benchmarks/losses_speed.py [--repeats 5] [--threads N] [--no-model]

Part 1 times each loss alone on (8, 11, 360, 480) logits (CamVid-like piecewise-constant labels, 5 % ignore).
Part 2 (when ``segcal.models.load("espnet-camvid")`` works) times a full training step — forward, loss, backward,
SGD step — of ESPNet at 480×360, batch 8, with each loss. Prints the minimum seconds over interleaved rounds
and the ratio to CE.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from segcal.losses import get_loss

B, C, H, W = 8, 11, 360, 480
LOSSES: list[tuple[str, str, dict]] = [
    ("ce", "ce", {}),
    ("ls", "ls", {}),
    ("focal", "focal", {}),
    ("ecp", "ecp", {}),
    ("svls", "svls", {}),
    ("mbls", "mbls", {}),
    ("nacl", "nacl", {}),
    ("nacl-gaussian", "nacl", {"kernel": "gaussian"}),
    ("aslp-multiclass", "aslp", {"multiclass": True, "warmup_epochs": 0}),
]


def labels(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, C, (B, 1, 12, 16), generator=g).float()
    y = F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0].long()
    y[torch.rand(B, H, W, generator=g) < 0.05] = 255
    return y


def timed(fns: dict[str, Callable[[], None]], repeats: int) -> list[tuple[str, float]]:
    """Minimum time per function over ``repeats`` interleaved rounds: on a shared machine the minimum is the least
    disturbed run, and interleaving spreads load changes over all losses alike."""
    for fn in fns.values():
        fn()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return [(name, min(ts)) for name, ts in times.items()]


def make_loss(name: str, kwargs: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    loss = get_loss(name, **kwargs)
    if getattr(loss, "needs_ids", False):
        loss.on_epoch_start(0, val_accuracy=0.9)
        ids = [f"img{i}" for i in range(B)]
        return lambda z, y: loss(z, y, ids=ids)
    return loss


def table(title: str, rows: list[tuple[str, float]]) -> None:
    base = dict(rows)["ce"]
    print(f"\n{title}\n| loss | s | × CE |\n|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")


def bench_alone(repeats: int) -> None:
    y = labels()
    z0 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1)) * 3
    def torch_ce() -> None:
        z = z0.clone().requires_grad_(True)
        F.cross_entropy(z, y, ignore_index=255).backward()

    fns: dict[str, Callable[[], None]] = {"torch F.cross_entropy": torch_ce}
    for label, name, kwargs in LOSSES:
        fn = make_loss(name, kwargs)

        def step(fn: Callable = fn) -> None:
            z = z0.clone().requires_grad_(True)
            fn(z, y).backward()

        fns[label] = step
    table(f"Loss alone, forward + backward on ({B}, {C}, {H}, {W}) logits (min s)", timed(fns, repeats))


def bench_model(repeats: int) -> None:
    try:
        from segcal.models import load

        model = load("espnet-camvid")
    except Exception as err:  # missing weights/data: part 2 is optional
        print(f"\n(skipping the ESPNet step: {err})")
        return
    model.train()
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(2))
    y = labels()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    fns: dict[str, Callable[[], None]] = {}
    for label, name, kwargs in LOSSES:
        fn = make_loss(name, kwargs)

        def step(fn: Callable = fn) -> None:
            opt.zero_grad(set_to_none=True)
            fn(model(x), y).backward()
            opt.step()

        fns[label] = step
    table(f"ESPNet-CamVid training step (forward, loss, backward, SGD) at {W}×{H}, batch {B} (min s)",
          timed(fns, repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--no-model", action="store_true", help="only time the losses alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_alone(args.repeats)
    if not args.no_model:
        bench_model(args.repeats)


if __name__ == "__main__":
    main()
