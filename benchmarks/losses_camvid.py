"""Train-time calibration losses compared on real data: ESPNet-CamVid fine-tuned with each loss (issue 4, "Show").

Usage:
    SEGCAL_DATA=/work/shared/data GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \\
        .venv/bin/python benchmarks/losses_camvid.py [--out cache/losses] [--quick]

Protocol (identical for every loss; CE fine-tuned the same way is the baseline): start from the published
ESPNet-CamVid weights, fine-tune on CamVid train with Adam (lr 1e-4, weight decay 1e-4, poly 0.9), batch 8, random
crops, horizontal flips, seed 0, the same number of epochs/steps. Every run holds out the same seeded 5 % of the
training images (ASLP needs a held-out pixel accuracy; the other losses hold them out too, so all runs see the same
images). Hyperparameters come from small grids and are chosen on **val only**: lowest val ECE among the grid points
whose val mIoU is at least CE's val mIoU − 1 point. The chosen checkpoint of each family is linked to
``<out>/<family>/last.pt`` (loadable with ``segcal.models.load``; ``segcal benchmark --checkpoints <out>`` stacks
post-hoc calibrators on them); its CamVid **test** logits go to a cached :class:`~segcal.data.LogitsStore`.

Binary task (ASLP's setting): "Car vs rest" from CamVid. The 1-channel logit is ``s = z_Car − logsumexp(z_¬Car)``
of the pretrained 11-class ESPNet (exactly the log-odds of its softmax probability of Car), fine-tuned end to end
with BCE, label-smoothed BCE and ASLP (binary SC-BCE with adaptive α). Metrics on raw probabilities (no min–max
stretch): ECE (10 bins, pooled), over-confidence error OE, pixel accuracy.

Speed: the mean training step time from each run's log relative to CE, plus a clean timing of one full-resolution
(480×360) ESPNet training step (forward, loss, backward) with batch 8 per loss, interleaved round-robin over the
losses so that machine load drifts hit all of them alike; the median over repetitions is reported.

Everything is resumable: finished runs, val/test metrics and stores are reused; an interrupted run resumes from its
last epoch checkpoint. ``--quick`` is a ~1 minute smoke run (2 steps per run, tiny subsets) into ``<out>/quick``.
Results: ``<out>/results.json`` and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segcal.data import CamVid, Subset
from segcal.engine import Trainer, predict
from segcal.engine.evaluate import evaluate_store, to_jsonable
from segcal.losses import ASLP, SCBCELoss, get_loss
from segcal.models import load

CAR = 8  # CamVid class index of "Car"
KEEP = ("miou", "accuracy", "ece", "cw_ece", "nll", "brier", "boundary_ece", "interior_ece", "oe", "mce", "ace")


# ----------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One fine-tuning run: ``family`` groups the grid points of one method; ``kind`` = "multi" or "binary"."""

    name: str
    family: str
    loss: str  # get_loss name, or "bce" / "ls-bce" / "aslp" for the binary task
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "multi"


# Order = priority: if the budget runs out, the first ones (one point per family) are done.
MAIN_RUNS = [
    Run("ce", "ce", "ce"),
    Run("nacl-a0.1", "nacl", "nacl", {"alpha": 0.1}),
    Run("mbls-m10", "mbls", "mbls", {"margin": 10.0, "alpha": 0.1}),
    Run("ls-e0.1", "ls", "ls", {"epsilon": 0.1}),
    Run("focal-g3", "focal", "focal", {"gamma": 3.0}),
    Run("svls-s1", "svls", "svls", {"sigma": 1.0}),
    Run("ecp-b0.1", "ecp", "ecp", {"beta": 0.1}),
    Run("aslp-mc", "aslp-mc", "aslp", {"multiclass": True, "warmup_epochs": 1}),
    Run("nacl-a0.05", "nacl", "nacl", {"alpha": 0.05}),
    Run("mbls-m5", "mbls", "mbls", {"margin": 5.0, "alpha": 0.1}),
]
BINARY_RUNS = [
    Run("bce", "bce", "bce", kind="binary"),
    Run("ls-bce-e0.1", "ls-bce", "ls-bce", {"epsilon": 0.1}, kind="binary"),
    Run("aslp", "aslp", "aslp", {"warmup_epochs": 1}, kind="binary"),
]
TIMED = [("ce", "ce", {}), ("ls", "ls", {}), ("focal", "focal", {"gamma": 3.0}), ("ecp", "ecp", {}),
         ("svls", "svls", {}), ("mbls", "mbls", {}), ("nacl", "nacl", {}),
         ("aslp-mc", "aslp", {"multiclass": True, "warmup_epochs": 0})]


class TrainLoss(nn.Module):
    """Adapter between the Trainer and a segcal loss.

    Gives every loss an ``on_epoch_start`` hook so the Trainer holds out the same images for all runs, forwards the
    image ids to losses that need them (ASLP), and for the binary task turns the 2-channel ``[0, s]`` logits of
    :class:`BinaryHead` back into the single logit ``s``. Its ``state_dict`` carries the inner loss's state (ASLP's α).
    """

    def __init__(self, inner: nn.Module, binary: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.binary = binary
        self.needs_ids = bool(getattr(inner, "needs_ids", False))

    def on_epoch_start(self, epoch: int, val_accuracy: float | None = None) -> None:
        if hasattr(self.inner, "on_epoch_start"):
            self.inner.on_epoch_start(epoch, val_accuracy=val_accuracy)

    def forward(self, logits: Tensor, target: Tensor, ids: list[str] | None = None) -> Tensor:
        if self.binary:
            logits = (logits[:, 1] - logits[:, 0]).unsqueeze(1)
        if self.needs_ids:
            return self.inner(logits, target, ids=ids)
        return self.inner(logits, target)


def make_loss(run: Run) -> TrainLoss:
    if run.kind == "multi":
        return TrainLoss(get_loss(run.loss, **run.kwargs))
    if run.loss == "bce":
        inner: nn.Module = SCBCELoss(alpha=0.0)
    elif run.loss == "ls-bce":  # α = 1 makes SC-BCE deterministic label smoothing with ε = 2β
        inner = SCBCELoss(alpha=1.0, beta=run.kwargs["epsilon"] / 2)
    elif run.loss == "aslp":
        inner = ASLP(**run.kwargs)
    else:
        raise ValueError(f"unknown binary loss {run.loss!r}")
    return TrainLoss(inner, binary=True)


# ----------------------------------------------------------------------------------------------------- data / model
class BinaryHead(nn.Module):
    """11 class logits → ``[0, s]`` with ``s = z_k − logsumexp_{j≠k} z_j`` (softmax over the two = sigmoid(s))."""

    def __init__(self, base: nn.Module, k: int) -> None:
        super().__init__()
        self.base = base
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        z = self.base(x).float()
        rest = torch.cat([z[:, : self.k], z[:, self.k + 1:]], 1)
        s = z[:, self.k] - torch.logsumexp(rest, 1)
        return torch.stack([torch.zeros_like(s), s], 1)


def binary_model(checkpoint: Path | None = None) -> nn.Module:
    model = load("espnet-camvid")
    if checkpoint is not None:  # a binary checkpoint holds the 11-class network's weights (the head has none)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state, strict=True)
    model.head = BinaryHead(model.head, CAR)
    model.num_classes = 2
    model.class_names = ["not Car", "Car"]
    model.name = "espnet-camvid-car-vs-rest"
    return model


def every(dataset: Any, stride: int) -> Subset:
    """Every ``stride``-th image of a dataset (keeps its class names, split, ...)."""
    return Subset(dataset, range(0, len(dataset), max(1, stride)))


class CarVsRest:
    """CamVid with labels Car → 1, other classes → 0, void stays ``255``."""

    num_classes = 2
    class_names = ("not Car", "Car")
    ignore_index = 255

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.split = getattr(dataset, "split", None)
        self.dataset_name = "CamVid-Car-vs-rest"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = dict(self.dataset[i])
        t = np.asarray(s["target"])
        s["target"] = np.where(t == 255, 255, (t == CAR).astype(np.int64)).astype(np.int64)
        return s


# ----------------------------------------------------------------------------------------------------- helpers
def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=1, sort_keys=True))
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def history(run_dir: Path) -> list[dict]:
    p = run_dir / "log.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def summary(out: dict[str, Any]) -> dict[str, Any]:
    return {k: out[k] for k in KEEP if k in out}


# ----------------------------------------------------------------------------------------------------- phases
def train_run(run: Run, run_dir: Path, train_data: Any, cfg: dict[str, Any]) -> nn.Module:
    """Fine-tune (or resume / reuse) one run; returns the trained model in eval mode."""
    ckpt = run_dir / "last.pt"
    done = len(history(run_dir)) >= cfg["epochs"] and ckpt.is_file()
    if run.kind == "binary":
        model = binary_model(ckpt if done else None)
    else:
        model = load(ckpt) if done else load("espnet-camvid")
    if done:
        return model.eval()
    log(f"train {run.name} ({run.loss} {run.kwargs})")
    t0 = time.perf_counter()
    trainer = Trainer(model, loss=make_loss(run), train_data=train_data, val_data=None, out_dir=run_dir,
                      progress=True, **cfg)
    trainer.fit(resume=True)
    log(f"  {run.name}: {trainer.global_step} steps in {time.perf_counter() - t0:.0f} s, "
        f"step {mean_step_time(run_dir):.2f} s")
    return model.eval()


def mean_step_time(run_dir: Path) -> float:
    h = history(run_dir)
    steps = sum(r.get("steps", 0) for r in h)
    return sum(r["step_time_mean"] * r["steps"] for r in h if r.get("steps")) / steps if steps else float("nan")


def val_metrics(name: str, run_dir: Path, make_model: Any, val_data: Any, n_bins: int) -> dict[str, Any]:
    """Val metrics of a run (cached in ``run_dir/val.json``; logits in a resumable store ``run_dir/val-store``)."""
    return store_metrics(f"val {name}", run_dir / "val.json", make_model, val_data, run_dir / "val-store", n_bins)


def test_metrics(name: str, run_dir: Path, make_model: Any, test_data: Any, store_dir: Path, n_bins: int
                 ) -> dict[str, Any]:
    """Test metrics of a run (cached in ``run_dir/test.json``); logits cached in a resumable store."""
    return store_metrics(f"test {name}", run_dir / "test.json", make_model, test_data, store_dir, n_bins)


def store_metrics(what: str, path: Path, make_model: Any, data: Any, store_dir: Path, n_bins: int) -> dict[str, Any]:
    """``segcal.engine.evaluate.evaluate_store`` on the float32 logits of a model (boundary band 2), cached."""
    cached = read_json(path)
    if cached is not None:
        return cached
    log(f"{what} → {store_dir}")
    store = predict(make_model(), data, store_dir, batch_size=4, progress=False, logits_dtype="float32")
    out = evaluate_store(store, n_bins=n_bins, boundary_width=2, progress=False)
    result = summary(out)
    if out.get("iou") is not None and store.num_classes == 2:  # binary task: IoU of the positive class (Car)
        result["car_iou"] = float(out["iou"][1])
    write_json(path, result)
    return result


def select(runs: list[Run], val: dict[str, dict], tol: float) -> dict[str, dict[str, Any]]:
    """Per family: lowest val ECE among grid points with val mIoU ≥ CE's − tol, else the best val mIoU."""
    floor = val["ce"]["miou"] - tol if "ce" in val else -1.0
    chosen: dict[str, dict[str, Any]] = {}
    for fam in dict.fromkeys(r.family for r in runs):
        cands = [r for r in runs if r.family == fam and r.name in val]
        if not cands:
            continue
        ok = [r for r in cands if val[r.name]["miou"] >= floor]
        if ok:
            best = min(ok, key=lambda r: val[r.name]["ece"])
            rule = "min val ECE s.t. val mIoU ≥ CE − tol"
        else:
            best = max(cands, key=lambda r: val[r.name]["miou"])
            rule = "no grid point met the mIoU floor: max val mIoU"
        chosen[fam] = {"run": best.name, "kwargs": best.kwargs, "rule": rule,
                       "grid": {r.name: {"val_ece": val[r.name]["ece"], "val_miou": val[r.name]["miou"]}
                                for r in cands}}
    return chosen


def link_checkpoint(src: Path, dst_dir: Path, info: dict) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "last.pt"
    if dst.exists() and dst.samefile(src):
        pass
    else:
        tmp = dst_dir / ".last.pt.tmp"
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    write_json(dst_dir / "selected.json", info)


def timing(repeats: int, size: tuple[int, int], batch: int) -> dict[str, Any]:
    """Median seconds of one ESPNet training step (forward, loss, backward) per loss, interleaved round-robin."""
    h, w = size
    model = load("espnet-camvid").train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, h, w, generator=g)
    # CamVid-like piecewise-constant labels with some void
    coarse = torch.randint(0, 11, (batch, 1, max(1, h // 30), max(1, w // 30)), generator=g).float()
    y = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    y[torch.rand(batch, h, w, generator=g) < 0.05] = 255
    ids = [f"im{i}" for i in range(batch)]
    fns = {}
    for label, name, kw in TIMED:
        loss = get_loss(name, **kw)
        if getattr(loss, "needs_ids", False):
            loss.on_epoch_start(0, val_accuracy=0.9)
            fns[label] = lambda z, t, loss=loss: loss(z, t, ids=ids)
        else:
            fns[label] = loss
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats + 1):  # repetition 0 warms up allocator and kernels
        for label, fn in fns.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn(model(x), y).backward()
            dt = time.perf_counter() - t0
            if rep > 0:
                times[label].append(dt)
        log(f"timing repetition {rep}/{repeats} done")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"size": [h, w], "batch": batch, "repeats": repeats, "median_s": med,
            "ratio_to_ce": {k: v / med["ce"] for k, v in med.items()}, "all_s": times}


# ----------------------------------------------------------------------------------------------------- tables
def fmt(v: Any, pct: bool = False, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.{digits}f}"


def main_table(res: dict[str, Any]) -> str:
    rows = res.get("main", {})
    ce_step = rows.get("ce", {}).get("step_time")
    timing_ratio = (res.get("timing") or {}).get("ratio_to_ce", {})
    lines = ["| loss (chosen on val) | mIoU | pixel acc. | ECE | CW-ECE | NLL | Brier | boundary ECE | "
             "step time × CE (log) | fwd+bwd × CE (full res) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = res.get("reference")
    if ref and ref.get("test"):
        t = ref["test"]
        cells = [fmt(t["miou"], True), fmt(t["accuracy"], True), fmt(t["ece"]), fmt(t["cw_ece"]), fmt(t["nll"]),
                 fmt(t["brier"]), fmt(t.get("boundary_ece")), "–", "–"]
        lines.append(f"| *{ref['label']}* | " + " | ".join(cells) + " |")
    for fam, r in rows.items():
        t = r.get("test")
        if t is None:
            continue
        step = r.get("step_time")
        ratio_log = step / ce_step if step and ce_step else None
        lines.append(
            f"| {r['label']} | {fmt(t['miou'], True)} | {fmt(t['accuracy'], True)} | {fmt(t['ece'])} | "
            f"{fmt(t['cw_ece'])} | {fmt(t['nll'])} | {fmt(t['brier'])} | {fmt(t.get('boundary_ece'))} | "
            f"{fmt(ratio_log, digits=2)} | {fmt(timing_ratio.get(fam), digits=2)} |")
    return "\n".join(lines)


def grid_table(res: dict[str, Any]) -> str:
    lines = ["| run | family | val mIoU | val ECE | val CW-ECE | chosen |", "|---|---|---:|---:|---:|:-:|"]
    chosen = {v["run"] for v in res.get("selection", {}).values()}
    ref = (res.get("reference") or {}).get("val")
    if ref:
        lines.append(f"| *pretrained (reference)* | – | {fmt(ref['miou'], True)} | {fmt(ref['ece'])} | "
                     f"{fmt(ref.get('cw_ece'))} | |")
    for name, v in res.get("val", {}).items():
        lines.append(f"| {name} | {v['family']} | {fmt(v['miou'], True)} | {fmt(v['ece'])} | "
                     f"{fmt(v.get('cw_ece'))} | {'✓' if name in chosen else ''} |")
    return "\n".join(lines)


def binary_table(res: dict[str, Any]) -> str:
    lines = ["| loss | pixel acc. | ECE (10 bins) | OE | NLL | Brier | Car IoU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = list(res.get("binary", {}).values())
    if res.get("binary_reference"):
        rows.insert(0, {**res["binary_reference"], "label": f"*{res['binary_reference']['label']}*"})
    for r in rows:
        t = r.get("test")
        if t is None:
            continue
        lines.append(f"| {r['label']} | {fmt(t['accuracy'], True)} | {fmt(t['ece'])} | {fmt(t['oe'])} | "
                     f"{fmt(t['nll'])} | {fmt(t['brier'])} | {fmt(t.get('car_iou'), True)} |")
    return "\n".join(lines)


def timing_table(res: dict[str, Any]) -> str:
    t = res.get("timing")
    if not t:
        return "(timing not run)"
    h, w = t["size"]
    lines = [f"ESPNet training step (forward + loss + backward), batch {t['batch']}, {w}×{h}, median of "
             f"{t['repeats']} interleaved repetitions:", "", "| loss | median s | × CE |", "|---|---:|---:|"]
    for k, v in t["median_s"].items():
        lines.append(f"| {k} | {v:.3f} | {t['ratio_to_ce'][k]:.2f} |")
    return "\n".join(lines)


def label(run: Run) -> str:
    return run.name if not run.kwargs else f"{run.family} ({', '.join(f'{k}={v}' for k, v in run.kwargs.items())})"


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("cache/losses"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps per run, tiny subsets, into <out>/quick")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="cap steps per epoch (default: full epochs)")
    ap.add_argument("--crop", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-stride", type=int, default=1, help="select on every N-th val image (default all)")
    ap.add_argument("--test-stride", type=int, default=1, help="test on every N-th test image (default all)")
    ap.add_argument("--holdout", type=float, default=0.05, help="held-out fraction of train (all runs)")
    ap.add_argument("--miou-tol", type=float, default=0.01, help="selection: val mIoU ≥ CE's − this")
    ap.add_argument("--only", nargs="*", default=None, help="restrict to these run names")
    ap.add_argument("--no-binary", action="store_true")
    ap.add_argument("--no-pretrained", action="store_true", help="skip the not-fine-tuned reference rows")
    ap.add_argument("--timing-repeats", type=int, default=3, help="0 skips the clean timing")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out / "quick" if args.quick else args.out
    cfg: dict[str, Any] = {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "adam", "lr": args.lr,
                           "weight_decay": 1e-4, "poly_power": 0.9, "seed": 0, "crop_size": tuple(args.crop),
                           "hflip": True, "holdout_fraction": args.holdout, "max_steps_per_epoch": args.steps_per_epoch}
    val_n, test_n = args.val_stride, args.test_stride
    timing_size, timing_batch, timing_reps = (360, 480), 8, args.timing_repeats
    if args.quick:
        cfg.update(epochs=2, batch_size=2, max_steps_per_epoch=1, crop_size=(120, 160), subset=4,
                   holdout_fraction=0.003)
        val_n, test_n = 50, 116
        timing_size, timing_batch, timing_reps = (120, 160), 2, min(timing_reps, 1)
    main_runs = [r for r in MAIN_RUNS if args.only is None or r.name in args.only]
    bin_runs = [] if args.no_binary else [r for r in BINARY_RUNS if args.only is None or r.name in args.only]
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; out={out}; config={cfg}")

    res_path = out / "results.json"
    res: dict[str, Any] = read_json(res_path) or {}
    res.update({"config": cfg, "val_stride": val_n, "test_stride": test_n, "miou_tol": args.miou_tol,
                "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])})

    train = CamVid(split="train")
    val = every(CamVid(split="val"), val_n)
    test = every(CamVid(split="test"), test_n)

    # 1. main grid: train + val metrics
    res.setdefault("val", {})
    for run in main_runs:
        run_dir = out / "grid" / run.name
        model = train_run(run, run_dir, train, cfg)
        v = val_metrics(run.name, run_dir, lambda m=model: m, val, n_bins=15)
        res["val"][run.name] = {**v, "family": run.family, "step_time": mean_step_time(run_dir)}
        write_json(res_path, res)
        del model

    # 2. selection on val, 3. test metrics of the chosen checkpoints
    done_runs = [r for r in MAIN_RUNS if r.name in res["val"]]
    res["selection"] = select(done_runs, res["val"], args.miou_tol)
    res.setdefault("main", {})
    by_name = {r.name: r for r in MAIN_RUNS}
    for fam, sel in res["selection"].items():
        run = by_name[sel["run"]]
        src_dir = out / "grid" / run.name
        fam_dir = out / fam
        link_checkpoint(src_dir / "last.pt", fam_dir, {"run": run.name, "kwargs": run.kwargs, "rule": sel["rule"]})
        t = test_metrics(run.name, src_dir, lambda p=src_dir / "last.pt": load(p).eval(), test,
                         out / "stores" / f"{run.name}-test", n_bins=15)
        res["main"][fam] = {"run": run.name, "label": label(run), "test": t, "val": res["val"][run.name],
                            "step_time": res["val"][run.name]["step_time"]}
        write_json(res_path, res)

    # reference: the published weights without fine-tuning (no last.pt in its folder, so not a "run")
    if not args.no_pretrained:
        ref_dir = out / "reference" / "pretrained"
        v = val_metrics("pretrained", ref_dir, lambda: load("espnet-camvid").eval(), val, n_bins=15)
        t = test_metrics("pretrained", ref_dir, lambda: load("espnet-camvid").eval(), test,
                         out / "stores" / "pretrained-test", n_bins=15)
        res["reference"] = {"label": "pretrained ESPNet, not fine-tuned (reference)", "val": v, "test": t}
        write_json(res_path, res)

    # 4. binary task (Car vs rest): BCE, LS-BCE, ASLP
    btrain, btest = CarVsRest(train), CarVsRest(test)
    if bin_runs and not args.no_pretrained:
        ref_dir = out / "reference" / "car-pretrained"
        store_dir = out / "stores" / "car-pretrained-test"
        t = test_metrics("car-pretrained", ref_dir, lambda: binary_model().eval(), btest, store_dir, n_bins=10)
        res["binary_reference"] = {"label": "pretrained, not fine-tuned (reference)", "test": t}
        write_json(res_path, res)
    if bin_runs:
        res.setdefault("binary", {})
        for run in bin_runs:
            run_dir = out / "binary-car" / run.name
            model = train_run(run, run_dir, btrain, cfg)
            store_dir = out / "stores" / f"car-{run.name}-test"
            t = test_metrics(run.name, run_dir, lambda m=model: m, btest, store_dir, n_bins=10)
            res["binary"][run.name] = {"label": label(run), "test": t, "step_time": mean_step_time(run_dir),
                                       "aslp_alpha": aslp_alpha_stats(run_dir)}
            write_json(res_path, res)
            del model

    # 5. clean timing
    if timing_reps > 0 and not res.get("timing", {}).get("repeats") == timing_reps:
        log(f"timing {len(TIMED)} losses × {timing_reps} repetitions at {timing_size}, batch {timing_batch}")
        res["timing"] = timing(timing_reps, timing_size, timing_batch)
        write_json(res_path, res)

    for r in res.get("main", {}).values():
        if r["run"].startswith("aslp"):
            r["aslp_alpha"] = aslp_alpha_stats(out / "grid" / r["run"])
    write_json(res_path, res)
    print("\n## Main table: CamVid test (ECE/CW-ECE 15 bins, boundary band 2 px)\n")
    print(main_table(res))
    print("\n## Val grid (selection)\n")
    print(grid_table(res))
    print("\n## Binary task: Car vs rest, CamVid test (ECE 10 bins, pooled, raw probabilities)\n")
    print(binary_table(res))
    print("\n## Speed\n")
    print(timing_table(res))
    log(f"results in {res_path}")
    return 0


def aslp_alpha_stats(run_dir: Path) -> dict[str, float] | None:
    """Summary of the per-image α an ASLP run ended with (read back through the loss's own state)."""
    ckpt = run_dir / "last.pt"
    if not ckpt.is_file():
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=True).get("loss") or {}
    if not state:
        return None
    loss = TrainLoss(ASLP())
    loss.load_state_dict(state, strict=False)
    a = np.array(list(loss.inner.alpha_.values()), dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "max": float(a.max()), "min": float(a.min()),
            "val_accuracy": loss.inner.val_accuracy}


if __name__ == "__main__":
    sys.exit(main())
