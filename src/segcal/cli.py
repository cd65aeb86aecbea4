"""The ``segcal`` command. Thin: parses arguments and calls the library; no library module imports it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

COMMANDS = {
    "train": "fine-tune a segmentation model with a (calibration) loss",
    "predict": "run a model over a dataset split or image folder and store logits",
    "fit": "fit a post-hoc calibrator on a logits store",
    "evaluate": "calibration metrics of a logits store (optionally through a calibrator)",
    "detect": "write per-pixel error / OOD score maps for a folder of images",
    "evaluate-detection": "error (IDM) and OOD detection metrics of detectors on a logits store",
    "benchmark": "reproduce the comparison tables on real data",
    "report": "render a results folder as a self-contained HTML report",
    "demo": "the quick end-to-end job (README's first command)",
}


def _key_values(items: Sequence[str] | None) -> dict[str, Any]:
    """``["alpha=0.1", "kernel=mean"]`` → ``{"alpha": 0.1, "kernel": "mean"}`` (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out


def _dist_init() -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl with CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _dataset(args: argparse.Namespace) -> Any:
    from segcal import data

    if getattr(args, "images", None):
        return data.SegmentationFolder(args.images, labels=getattr(args, "labels", None))
    if args.dataset == "camvid":
        return data.CamVid(split=args.split)
    if args.dataset == "synthetic":
        return data.SyntheticSegmentation(n=args.synthetic_n, size=(96, 128), num_classes=11, seed=0)
    raise ValueError(f"unknown --dataset {args.dataset!r}; choose camvid or synthetic, or give --images DIR")


# ----------------------------------------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="espnet-camvid", help="model name or checkpoint path to start from")
    p.add_argument("--dataset", default="camvid", choices=["camvid", "synthetic"])
    p.add_argument("--loss", default="ce", help="ce, ls, focal, ecp, svls, mbls, nacl, aslp")
    p.add_argument("--loss-arg", action="append", metavar="K=V", help="loss hyperparameter, repeatable")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None, help="random crop size")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory (checkpoints, log)")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--synthetic-n", type=int, default=16, help=argparse.SUPPRESS)


def _run_train(args: argparse.Namespace) -> int:
    from segcal import data, losses, models
    from segcal.engine import Trainer

    model = models.load(args.model)
    if args.dataset == "camvid":
        train_set, val_set = data.CamVid(split="train"), data.CamVid(split="val")
    else:
        # one dataset, split by index: the synthetic class colours depend on the seed
        full = data.SyntheticSegmentation(n=args.synthetic_n + 4, size=(96, 128), num_classes=model.num_classes,
                                          seed=0)
        train_set = data.Subset(full, range(args.synthetic_n))
        val_set = data.Subset(full, range(args.synthetic_n, len(full)))
    loss = losses.get_loss(args.loss, **_key_values(args.loss_arg))
    trainer = Trainer(model, loss, train_set, val_set, out_dir=args.out, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, crop_size=args.crop,
                      max_steps_per_epoch=args.max_steps_per_epoch)
    trainer.fit(resume=not args.no_resume)
    print(f"checkpoints and log in {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------------- predict
def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="espnet-camvid", help="model name or checkpoint path")
    p.add_argument("--dataset", default="camvid", choices=["camvid", "synthetic"])
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--images", help="an image folder instead of --dataset")
    p.add_argument("--labels", help="label folder matching --images (optional)")
    p.add_argument("--out", required=True, help="logits store directory (resumed if it exists)")
    p.add_argument("--features", action="store_true", help="also store decoder features (for FlowEneDet)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--corruption", help="apply a corruption (see segcal.data.CORRUPTIONS)")
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--synthetic-n", type=int, default=16, help=argparse.SUPPRESS)


def _run_predict(args: argparse.Namespace) -> int:
    from segcal import data, models
    from segcal.engine import predict

    rank, world = _dist_init()
    dataset = _dataset(args)
    if args.corruption:
        dataset = data.CorruptedDataset(dataset, args.corruption, args.severity)
    store = predict(models.load(args.model), dataset, args.out, batch_size=args.batch_size, features=args.features,
                    rank=rank, world_size=world)
    if rank == 0:
        print(f"{len(store)} images in logits store {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------------- fit
def _add_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibrator", required=True,
                   help="ts, vs, ms, dirichlet, ets, lts, selective, histogram, isotonic")
    p.add_argument("--logits", required=True, help="logits store to fit on (a validation split)")
    p.add_argument("--out", required=True, help="output calibrator file")
    p.add_argument("--arg", action="append", metavar="K=V", help="calibrator hyperparameter, repeatable")
    p.add_argument("--batch-size", type=int, default=4)


def _run_fit(args: argparse.Namespace) -> int:
    from segcal.calibrators import get_calibrator
    from segcal.data import LogitsStore

    rank, world = _dist_init()
    store = LogitsStore(args.logits)
    cal = get_calibrator(args.calibrator, **_key_values(args.arg))
    # Under torchrun each rank streams its shard; the calibrator all-reduces its sufficient statistics.
    shard = store.shard_names(rank, world) if world > 1 else None
    cal.fit(lambda: store.batches(batch_size=args.batch_size, names=shard))
    if rank == 0:
        cal.save(args.out)
        print(f"{type(cal).__name__} fitted on {len(store)} images: {cal.get_params()} → {args.out}")
    return 0


# -------------------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logits", required=True, help="logits store (with labels)")
    p.add_argument("--calibrator", help="a calibrator file written by `segcal fit`")
    p.add_argument("--json", help="write the metrics here (rank 0)")
    p.add_argument("--n-bins", type=int, default=15)
    p.add_argument("--boundary-width", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)


def _run_evaluate(args: argparse.Namespace) -> int:
    from segcal.data import LogitsStore
    from segcal.engine.evaluate import evaluate_store

    rank, world = _dist_init()
    store = LogitsStore(args.logits)
    transform = None
    if args.calibrator:
        from segcal.calibrators import load as load_calibrator

        transform = load_calibrator(args.calibrator).transform
    result = evaluate_store(store, transform, n_bins=args.n_bins, boundary_width=args.boundary_width,
                            batch_size=args.batch_size, rank=rank, world_size=world)
    if rank == 0:
        scalars = {k: v for k, v in result.items() if isinstance(v, int | float)}
        width = max(len(k) for k in scalars)
        for k, v in scalars.items():
            print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True))
            print(f"metrics written to {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------------------- report
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", help="folder with results.json (from `segcal benchmark` or `segcal demo`)")


def _run_report(args: argparse.Namespace) -> int:
    from segcal.report import render_report

    print(f"report: {render_report(args.results_dir)}")
    return 0


# ---------------------------------------------------------------------------------------------------------- detect
def _add_detect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="espnet-camvid", help="model name or checkpoint path")
    p.add_argument("--detector", required=True,
                   help="msp, max_logit, entropy, energy, sml, flowenedet-u, flowenedet-c, selective")
    p.add_argument("--detector-file", help="a fitted detector (FlowEneDet.save) or calibrator (selective) file; "
                                           "default: the one shipped for --model")
    p.add_argument("--images", required=True, help="folder of images (any size)")
    p.add_argument("--out", required=True, help="output folder: <stem>.npy float16 score maps (H, W)")


def _load_detector(name: str, model_name: str, path: str | None) -> Any:
    from segcal import detectors

    key = name.lower().replace("_", "-")
    if key in ("msp", "max-logit", "entropy", "energy"):
        return detectors.get_detector(name)
    if key == "selective":
        if not path:
            raise ValueError("--detector selective needs --detector-file: a SelectiveScaling file from "
                             "`segcal fit --calibrator selective`")
        from segcal.calibrators import load as load_calibrator

        return detectors.SelectiveDetector(load_calibrator(path))
    if key.startswith("flowenedet"):
        if path:
            return detectors.FlowEneDet.load(path)
        return detectors.load_pretrained(Path(model_name).stem, variant=key[-1])
    if key == "sml":
        if path:
            return detectors.StandardizedMaxLogit.load(path)
        return detectors.load_pretrained_sml(Path(model_name).stem)
    return detectors.get_detector(name)


def _run_detect(args: argparse.Namespace) -> int:
    from segcal import models
    from segcal.engine.detect import detect_folder

    detector = _load_detector(args.detector, args.model, args.detector_file)
    paths = detect_folder(models.load(args.model), detector, args.images, args.out)
    print(f"{len(paths)} score maps in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- evaluate-detection
def _add_evaluate_detection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logits", help="labelled logits store: IDM metrics (positive = mispredicted valid pixel)")
    p.add_argument("--model", default="espnet-camvid", help="model for --anomalies and for shipped detectors")
    p.add_argument("--anomalies", action="store_true",
                   help="OOD metrics on CamVid test frames with pasted objects (runs --model on the fly)")
    p.add_argument("--n-images", type=int, default=40, help="test frames for --anomalies")
    p.add_argument("--detectors", nargs="+", default=["msp", "max_logit", "entropy", "energy"])
    p.add_argument("--detector-file", action="append", metavar="NAME=PATH", default=[],
                   help="fitted detector for NAME (sml / flowenedet-* / selective); default: the shipped one")
    p.add_argument("--json", help="write the metrics here")


def _run_evaluate_detection(args: argparse.Namespace) -> int:
    from segcal.engine.benchmark import BenchmarkConfig, evaluate_anomalies, evaluate_idm

    if not args.logits and not args.anomalies:
        raise ValueError("give --logits STORE (error detection) and/or --anomalies (OOD detection)")
    files = dict(item.split("=", 1) for item in args.detector_file)
    detectors = {name: _load_detector(name, args.model, files.get(name)) for name in args.detectors}
    cfg = BenchmarkConfig(out=Path("."), n_shift_images=args.n_images)
    results: dict[str, Any] = {}
    if args.logits:
        from segcal.data import LogitsStore

        results["idm"] = evaluate_idm(LogitsStore(args.logits), detectors, cfg)
    if args.anomalies:
        from segcal import models
        from segcal.data import CamVid

        results["ood_pasted_anomalies"] = evaluate_anomalies(models.load(args.model), CamVid(split="test"),
                                                             detectors, cfg)
    for protocol, per_det in results.items():
        print(f"{protocol}:")
        for name, r in per_det.items():
            extra = "".join(f"  {k}={r[k]:.4f}" for k in ("auroc_per_image", "ap_per_image") if r.get(k) is not None)
            print(f"  {name:<14} auroc={r['auroc']:.4f}  ap={r['ap']:.4f}  fpr95={r['fpr95']:.4f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ benchmark / demo
def _add_benchmark(p: argparse.ArgumentParser) -> None:
    from segcal.engine.benchmark import ALL_CALIBRATORS, ALL_CORRUPTIONS, ALL_DETECTORS

    p.add_argument("--model", default="espnet-camvid")
    p.add_argument("--shift-model", default="espnet-cityscapes", help="second model evaluated on CamVid ('' = none)")
    p.add_argument("--calibrators", nargs="*", default=list(ALL_CALIBRATORS))
    p.add_argument("--detectors", nargs="*", default=list(ALL_DETECTORS))
    p.add_argument("--corruptions", nargs="*", default=list(ALL_CORRUPTIONS))
    p.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--n-images", type=int, default=None, help="evenly spaced frames per split (default: all)")
    p.add_argument("--n-shift-images", type=int, default=40, help="test frames for the corruption/anomaly protocols")
    p.add_argument("--checkpoints", help="folder of `segcal train` runs to evaluate too")
    p.add_argument("--cache", default="cache", help="logits cache (reused across runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)


def _run_benchmark(args: argparse.Namespace) -> int:
    from segcal.engine.benchmark import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig(out=Path(args.out), model=args.model, shift_model=args.shift_model or None,
                          cache=Path(args.cache), calibrators=args.calibrators, detectors=args.detectors,
                          corruptions=args.corruptions, severities=args.severities, n_images=args.n_images,
                          n_shift_images=args.n_shift_images, seed=args.seed,
                          checkpoints=Path(args.checkpoints) if args.checkpoints else None)
    run_benchmark(cfg)
    print(f"results: {Path(args.out) / 'results.md'}\nreport:  {Path(args.out) / 'index.html'}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out")
    p.add_argument("--n-images", type=int, default=16, help="evenly spaced frames per split")
    p.add_argument("--synthetic", action="store_true", help="force the synthetic fallback")
    p.add_argument("--cache", default="cache")


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from segcal.engine.benchmark import demo_config, real_data_available, run_benchmark

    synthetic = args.synthetic or not real_data_available()
    if synthetic and not args.synthetic:
        print("segcal demo: no CamVid / ESPNet weights under $SEGCAL_DATA "
              f"({os.environ.get('SEGCAL_DATA', '../shared/data')}); running on SYNTHETIC data instead — "
              "the numbers describe a toy task, not a real model.", file=sys.stderr)
    cfg = demo_config(Path(args.out), n_images=args.n_images, synthetic=synthetic)
    cfg.cache = Path(args.cache)
    start = time.perf_counter()
    results = run_benchmark(cfg)
    print((Path(args.out) / "results.md").read_text())
    print(f"demo finished in {time.perf_counter() - start:.0f} s on {results['meta']['dataset']}")
    print(f"report:  {Path(args.out).resolve() / 'index.html'}")
    print(f"results: {Path(args.out).resolve() / 'results.json'}")
    return 0


_ADD_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train": _add_train, "predict": _add_predict, "fit": _add_fit, "evaluate": _add_evaluate, "report": _add_report,
    "benchmark": _add_benchmark, "demo": _add_demo, "detect": _add_detect,
    "evaluate-detection": _add_evaluate_detection,
}
_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _run_train, "predict": _run_predict, "fit": _run_fit, "evaluate": _run_evaluate, "report": _run_report,
    "benchmark": _run_benchmark, "demo": _run_demo, "detect": _run_detect,
    "evaluate-detection": _run_evaluate_detection,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segcal", description="Trustworthy confidence for semantic segmentation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in _ADD_ARGS:
            _ADD_ARGS[name](p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = _HANDLERS.get(args.command)
    if handler is None:
        print(f"segcal {args.command}: not implemented yet", file=sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except (ValueError, TypeError, KeyError, OSError) as err:
        if os.environ.get("SEGCAL_DEBUG"):
            raise
        print(f"segcal {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"segcal {args.command}: interrupted; finished work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
