"""The ``segcal`` command. Thin: parses arguments and calls the library; no library module imports it.

Every command that runs a model or reads a dataset takes the same specs: ``--model`` (a published name, a segcal
checkpoint, a TorchScript file, or ``file.py:callable`` / ``package.module:callable``), ``--data`` (``camvid``,
``synthetic`` or a folder root ``ROOT/<split>/images`` + ``ROOT/<split>/labels``), ``--ignore-index N|none``,
``--preprocess imagenet|none`` and ``--device``. Methods are found by their registry names, so a calibrator or
detector registered by user code is available here without any edit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("segcal")

COMMANDS = {
    "train": "fine-tune a segmentation model with a (calibration) loss",
    "predict": "run a model over a dataset split or image folder and store logits",
    "fit": "fit a post-hoc calibrator or a detector on a logits store",
    "evaluate": "calibration metrics of a logits store (optionally through a calibrator)",
    "detect": "write per-pixel error / OOD score maps for a folder of images",
    "evaluate-detection": "error (IDM) and OOD detection metrics of detectors on a logits store",
    "benchmark": "the full protocol on a model and labelled data: results.json, results.md and a report",
    "conformal": "conformal risk control: fit a guarantee on a calibration store, judge it on held-out stores",
    "report": "render a results folder as a self-contained HTML report",
    "demo": "the quick end-to-end job (README's first command)",
}


# ------------------------------------------------------------------------------------------------------ helpers
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


def _ignore_index(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer label or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--ignore-index must be >= 0 or 'none', got {value}")
    return value


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


def _dist_close() -> None:
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", required=required, default=None, metavar="SPEC",
                   help="published name, segcal checkpoint, TorchScript file, or file.py:callable / "
                        "package.module:callable returning an nn.Module or a Segmenter "
                        "(default: the dataset's default model)")
    p.add_argument("--preprocess", default="imagenet", choices=["imagenet", "none"],
                   help="for plain nn.Modules: ImageNet normalisation, or float RGB 0-255 (default imagenet)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when available, else CPU)")


def _add_data_args(p: argparse.ArgumentParser, splits: bool = False) -> None:
    p.add_argument("--data", default="camvid", metavar="SPEC",
                   help="camvid, synthetic, or a folder root ROOT/<split>/images/* + ROOT/<split>/labels/* "
                        "(+ optional ROOT/classes.txt) (default camvid)")
    p.add_argument("--ignore-index", type=_ignore_index, default=255, metavar="N|none",
                   help="void label of the data, carried into every store and stage (default 255)")
    if splits:
        p.add_argument("--fit-split", default="val", help="split calibrators and detectors are fitted on")
        p.add_argument("--eval-splits", nargs="+", default=["test"], help="splits evaluated")


def _model(args: argparse.Namespace) -> Any:
    from segcal import models

    spec = args.model or _default_model(args)
    return models.load(spec, preprocess=args.preprocess, device=args.device)


def _default_model(args: argparse.Namespace) -> str:
    data_spec = getattr(args, "data", None)
    if data_spec:
        from segcal.data import load_dataset

        split = getattr(args, "split", None) or getattr(args, "fit_split", None) or "val"
        default = getattr(load_dataset(data_spec, split, ignore_index=args.ignore_index), "default_model", None)
        if default:
            return str(default)
    raise ValueError("give --model SPEC (a published name, a checkpoint, a TorchScript file or file.py:callable)")


def _write_json(path: str, obj: Any) -> None:
    from segcal._io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(obj, indent=1, sort_keys=True))


def _images_source(args: argparse.Namespace, store: Any) -> Any:
    """The dataset that holds the images of a store (for methods that need images), from ``--data``."""
    if not getattr(args, "data", None):
        raise ValueError("this method needs the images: give --data SPEC (the store's dataset)")
    from segcal.data import load_dataset

    return load_dataset(args.data, store.manifest.get("split") or "val", ignore_index=store.ignore_index)


def _learned(est: Any) -> dict[str, Any]:
    """Short, printable view of an estimator's learned attributes (scalars and small tensors)."""
    out = {}
    for key, value in vars(est).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if hasattr(value, "numel"):
            if value.numel() > 8:
                out[key] = f"tensor{tuple(value.shape)}"
                continue
            value = value.tolist()
        if isinstance(value, float):
            value = round(value, 6)
        if isinstance(value, (int, float, str, bool, list)) or value is None:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="split for per-epoch validation ('' = none)")
    p.add_argument("--loss", default="ce", help="a registered loss: ce, ls, focal, ecp, svls, mbls, nacl, aslp")
    p.add_argument("--loss-arg", action="append", metavar="K=V", help="loss hyperparameter, repeatable")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None, help="random crop size")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory (checkpoints, log)")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")


def _run_train(args: argparse.Namespace) -> int:
    from segcal import losses
    from segcal.data import load_dataset
    from segcal.engine import Trainer

    model = _model(args)
    c = int(model.num_classes)
    train_set = load_dataset(args.data, args.train_split, ignore_index=args.ignore_index, num_classes=c)
    val_set = load_dataset(args.data, args.val_split, ignore_index=args.ignore_index, num_classes=c) \
        if args.val_split else None
    loss = losses.get_loss(args.loss, **{"ignore_index": args.ignore_index, **_key_values(args.loss_arg)})
    trainer = Trainer(model, loss, train_set, val_set, out_dir=args.out, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, crop_size=args.crop,
                      max_steps_per_epoch=args.max_steps_per_epoch)
    trainer.fit(resume=not args.no_resume)
    log.info("checkpoints and log in %s", args.out)
    return 0


# ----------------------------------------------------------------------------------------------------- predict
def _add_predict(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", default="val", help="split of --data to run on (default val)")
    p.add_argument("--images", help="a flat image folder instead of --data")
    p.add_argument("--labels", help="label folder matching --images (optional)")
    p.add_argument("--n-images", type=int, default=None, help="evenly spaced images of the split (default: all)")
    p.add_argument("--out", required=True, help="logits store directory (resumed if it exists)")
    p.add_argument("--features", action="store_true", help="also store decoder features (for FlowEneDet-C)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--corruption", help="apply a corruption (see segcal.data.CORRUPTIONS)")
    p.add_argument("--severity", type=int, default=3)


def _predict_dataset(args: argparse.Namespace, num_classes: int) -> Any:
    from segcal import data

    if args.images:
        dataset = data.SegmentationFolder(args.images, labels=args.labels, ignore_index=args.ignore_index)
    else:
        dataset = data.load_dataset(args.data, args.split, ignore_index=args.ignore_index, num_classes=num_classes)
    return data.Subset.evenly_spaced(dataset, args.n_images) if args.n_images else dataset


def _run_predict(args: argparse.Namespace) -> int:
    from segcal import data
    from segcal.engine import predict

    rank, world = _dist_init()
    model = _model(args)
    dataset = _predict_dataset(args, int(model.num_classes))
    if args.corruption:
        dataset = data.CorruptedDataset(dataset, args.corruption, args.severity)
    store = predict(model, dataset, args.out, batch_size=args.batch_size, features=args.features,
                    rank=rank, world_size=world)
    if rank == 0:
        log.info("%d images in logits store %s (%d classes, ignore_index %s)", len(store), args.out,
                 store.num_classes, store.ignore_index)
    return 0


# --------------------------------------------------------------------------------------------------------- fit
def _add_fit(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--calibrator", help="a registered calibrator: ts, vs, ms, dirichlet, ets, lts, selective, "
                                           "histogram, isotonic, …")
    what.add_argument("--detector", help="a registered detector that learns: sml, flowenedet-u, flowenedet-c, …")
    p.add_argument("--logits", required=True, help="logits store to fit on (a validation split)")
    p.add_argument("--out", required=True, help="output file (load it with segcal.calibrators.load / "
                                                "segcal.detectors.load)")
    p.add_argument("--arg", action="append", metavar="K=V", help="hyperparameter, repeatable")
    p.add_argument("--data", default=None, metavar="SPEC", help="the store's dataset, for methods that need images")
    p.add_argument("--batch-size", type=int, default=4)


def _run_fit(args: argparse.Namespace) -> int:
    from segcal.data import LogitsStore
    from segcal.engine.protocol import BenchmarkConfig, store_source

    rank, world = _dist_init()
    store = LogitsStore(args.logits)
    from segcal.engine.protocol import build_method

    if args.calibrator:
        from segcal.calibrators import CALIBRATORS as registry
    else:
        from segcal.detectors import DETECTORS as registry
    est = build_method(registry, args.calibrator or args.detector, store.ignore_index, _key_values(args.arg))
    needs_images = bool(getattr(est, "needs_images", False))
    needs_features = bool(getattr(est, "needs_features", False))
    if needs_features and not store.has_features:
        raise ValueError(f"{args.detector or args.calibrator} needs decoder features: predict the store with "
                         "--features")
    # Under torchrun each rank streams its shard; the calibrator all-reduces its sufficient statistics.
    shard = store.shard_names(rank, world) if world > 1 else None
    cfg = BenchmarkConfig(out=Path("."), batch_size=args.batch_size)
    source = store_source(store, cfg, dataset=_images_source(args, store) if needs_images else None,
                          images=needs_images, features=needs_features, names=shard)
    est.fit(source)
    if rank == 0:
        est.save(args.out)
        log.info("%s fitted on %d images (ignore_index %s): %s → %s", type(est).__name__, len(store),
                 store.ignore_index, _learned(est), args.out)
    return 0


# ---------------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logits", required=True, help="logits store (with labels)")
    p.add_argument("--calibrator", help="a calibrator file written by `segcal fit`")
    p.add_argument("--data", default=None, metavar="SPEC", help="the store's dataset, for calibrators needing images")
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

        cal = load_calibrator(args.calibrator)
        transform = cal.transform
        images = _images_source(args, store) if getattr(cal, "needs_images", False) else None
    else:
        images = None
    result = evaluate_store(store, transform, n_bins=args.n_bins, boundary_width=args.boundary_width,
                            batch_size=args.batch_size, rank=rank, world_size=world, images=images)
    if rank == 0:
        scalars = {k: v for k, v in result.items() if isinstance(v, int | float)}
        width = max(len(k) for k in scalars)
        for k, v in scalars.items():
            print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        if args.json:
            _write_json(args.json, result)
            log.info("metrics written to %s", args.json)
    return 0


# ------------------------------------------------------------------------------------------------------ report
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", help="folder with results.json (from `segcal benchmark` or `segcal demo`)")


def _run_report(args: argparse.Namespace) -> int:
    from segcal.report import render_report

    print(f"report: {render_report(args.results_dir)}")
    return 0


# ------------------------------------------------------------------------------------------------------ detect
def _add_detect(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--detector", required=True, help="a registered detector: msp, max_logit, entropy, energy, sml, "
                                                     "flowenedet-u, flowenedet-c, selective, …")
    p.add_argument("--detector-file", help="a fitted detector (`segcal fit --detector`) or a calibrator file "
                                           "for detectors built on one (selective); default: the one shipped "
                                           "for --model, if any")
    p.add_argument("--images", help="folder of images (any size)")
    p.add_argument("--data", default=None, metavar="SPEC", help="instead of --images: a dataset spec …")
    p.add_argument("--split", default="test", help="… and its split (labels not needed)")
    p.add_argument("--n-images", type=int, default=None, help="with --data: evenly spaced images (default: all)")
    p.add_argument("--ignore-index", type=_ignore_index, default=255, metavar="N|none")
    p.add_argument("--out", required=True, help="output folder: <stem>.npy float16 score maps (H, W)")


def load_detector(name: str, model: Any, path: str | None) -> Any:
    """A ready detector: from ``path`` (a fitted detector, or a calibrator the detector is built on), else the fit
    shipped for ``model``, else a fresh one — which must not need fitting."""
    from segcal.detectors import DETECTORS, Detector, get_detector

    if path:
        from segcal._estimator import Estimator

        obj = Estimator.load(path)
        if isinstance(obj, Detector):
            return obj
        return get_detector(name, calibrator=obj)
    cls = DETECTORS.resolve(name)
    if cls.requires_fit:
        shipped = cls.pretrained(str(getattr(model, "name", "")))
        if shipped is None:
            raise ValueError(f"detector {name!r} must be fitted first: `segcal fit --detector {name} --logits STORE "
                             f"--out FILE`, then pass --detector-file FILE")
        return shipped
    return get_detector(name)


def _run_detect(args: argparse.Namespace) -> int:
    from segcal.engine.detect import detect_folder

    model = _model(args)
    detector = load_detector(args.detector, model, args.detector_file)
    source: Any = args.images
    if not source:
        if not args.data:
            raise ValueError("give --images DIR or --data SPEC [--split S]")
        from segcal.data import Subset, load_dataset

        source = load_dataset(args.data, args.split, ignore_index=args.ignore_index,
                              num_classes=int(model.num_classes))
        if args.n_images:
            source = Subset.evenly_spaced(source, args.n_images)
    paths = detect_folder(model, detector, source, args.out)
    log.info("%d score maps in %s", len(paths), args.out)
    return 0


# ------------------------------------------------------------------------------------------ evaluate-detection
def _add_evaluate_detection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logits", help="labelled logits store: IDM metrics (positive = mispredicted valid pixel)")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", default="test", help="split of --data for --anomalies")
    p.add_argument("--anomalies", action="store_true",
                   help="OOD metrics on --data frames with pasted objects (runs --model on the fly)")
    p.add_argument("--n-images", type=int, default=40, help="frames for --anomalies")
    p.add_argument("--detectors", nargs="+", default=["msp", "max_logit", "entropy", "energy"])
    p.add_argument("--detector-file", action="append", metavar="NAME=PATH", default=[],
                   help="fitted detector for NAME; default: the one shipped for --model")
    p.add_argument("--json", help="write the metrics here")


def _run_evaluate_detection(args: argparse.Namespace) -> int:
    from segcal.engine.protocol import BenchmarkConfig, evaluate_anomalies, evaluate_idm_on_sets

    if not args.logits and not args.anomalies:
        raise ValueError("give --logits STORE (error detection) and/or --anomalies (OOD detection)")
    files = dict(item.split("=", 1) for item in args.detector_file)
    model = _model(args) if args.anomalies or args.model else None
    detectors = {name: load_detector(name, model, files.get(name)) for name in args.detectors}
    cfg = BenchmarkConfig(out=Path("."), n_shift_images=args.n_images)
    results: dict[str, Any] = {}
    if args.logits:
        from segcal.data import LogitsStore

        store = LogitsStore(args.logits)
        results["idm"] = evaluate_idm_on_sets(store, None, detectors, cfg, {"idm": None})["idm"]
    if args.anomalies:
        from segcal.data import load_dataset

        dataset = load_dataset(args.data, args.split, ignore_index=args.ignore_index,
                               num_classes=int(model.num_classes))
        results["ood_pasted_anomalies"] = evaluate_anomalies(model, dataset, detectors, cfg)
    for protocol, per_det in results.items():
        print(f"{protocol}:")
        for name, r in per_det.items():
            extra = "".join(f"  {k}={r[k]:.4f}" for k in ("auroc_per_image", "ap_per_image") if r.get(k) is not None)
            print(f"  {name:<14} auroc={r['auroc']:.4f}  ap={r['ap']:.4f}  fpr95={r['fpr95']:.4f}{extra}")
    if args.json:
        _write_json(args.json, results)
    return 0


# --------------------------------------------------------------------------------------------- benchmark / demo
def _add_benchmark(p: argparse.ArgumentParser) -> None:
    from segcal.engine.protocol import ALL_CORRUPTIONS

    _add_model_args(p)
    _add_data_args(p, splits=True)
    p.add_argument("--calibrators", nargs="*", default=None, help="registry names (default: every calibrator)")
    p.add_argument("--detectors", nargs="*", default=None, help="registry names (default: every detector)")
    p.add_argument("--corruptions", nargs="*", default=list(ALL_CORRUPTIONS))
    p.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--no-anomalies", action="store_true", help="skip the pasted-anomaly OOD protocol")
    p.add_argument("--shift-models", nargs="*", default=None, metavar="SPEC",
                   help="other models evaluated on the same data (default: the dataset's declared ones)")
    p.add_argument("--n-images", type=int, default=None, help="evenly spaced images per split (default: all)")
    p.add_argument("--n-shift-images", type=int, default=40, help="images for the corruption/anomaly protocols")
    p.add_argument("--n-bins", type=int, default=15)
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (0 = none)")
    p.add_argument("--pretrained-detectors", action="store_true",
                   help="use a detector's shipped fit for --model when one exists")
    p.add_argument("--conformal", action="append", default=[], metavar="METHOD[:K=V,...]",
                   help="also fit a conformal risk controller, e.g. coverage:alpha=0.1,epsilon=0.1 or "
                        "fnr:alpha=0.1,class_index=8 (repeatable)")
    p.add_argument("--checkpoints", help="folder of `segcal train` runs to evaluate too")
    p.add_argument("--method-arg", action="append", metavar="METHOD:K=V", default=[],
                   help="hyperparameter of one method, e.g. lts:epochs=2 (repeatable)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cache", default="cache", help="logits cache (reused across runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)


def _method_kwargs(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    from segcal.engine.protocol import BENCHMARK_KWARGS

    out = {k: dict(v) for k, v in BENCHMARK_KWARGS.items()}
    for item in items:
        method, _, kv = item.partition(":")
        if not kv:
            raise ValueError(f"--method-arg expects METHOD:KEY=VALUE, got {item!r}")
        out.setdefault(method, {}).update(_key_values([kv]))
    return out


def _conformal_specs(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for item in items:
        method, _, rest = item.partition(":")
        out[item] = {"method": method, **_key_values([kv for kv in rest.split(",") if kv])}
    return out


def _run_benchmark(args: argparse.Namespace) -> int:
    from segcal.engine.protocol import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig(out=Path(args.out), model=args.model, data=args.data, fit_split=args.fit_split,
                          eval_splits=args.eval_splits, ignore_index=args.ignore_index, preprocess=args.preprocess,
                          device=args.device, calibrators=args.calibrators, detectors=args.detectors,
                          corruptions=args.corruptions, severities=args.severities,
                          anomalies=not args.no_anomalies, shift_models=args.shift_models, n_images=args.n_images,
                          n_shift_images=args.n_shift_images, n_bins=args.n_bins,
                          bootstrap_resamples=args.bootstrap, pretrained_detectors=args.pretrained_detectors,
                          checkpoints=Path(args.checkpoints) if args.checkpoints else None,
                          method_kwargs=_method_kwargs(args.method_arg), conformal=_conformal_specs(args.conformal),
                          batch_size=args.batch_size,
                          cache=Path(args.cache), seed=args.seed)
    run_benchmark(cfg)
    print(f"results: {Path(args.out) / 'results.json'}\nreport:  {Path(args.out) / 'index.html'}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out")
    p.add_argument("--n-images", type=int, default=16, help="evenly spaced frames per split")
    p.add_argument("--synthetic", action="store_true", help="force the synthetic fallback")
    p.add_argument("--cache", default="cache")


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from segcal.data import data_root
    from segcal.engine.protocol import demo_config, real_data_available, run_benchmark

    synthetic = args.synthetic or not real_data_available()
    if synthetic and not args.synthetic:
        log.warning("segcal demo: no CamVid / ESPNet weights under the data root %s ($SEGCAL_DATA); running on "
                    "SYNTHETIC data instead — the numbers describe a toy task, not a real model.", data_root())
    cfg = demo_config(Path(args.out), n_images=args.n_images, synthetic=synthetic)
    cfg.cache = Path(args.cache)
    start = time.perf_counter()
    results = run_benchmark(cfg)
    print((Path(args.out) / "results.md").read_text())
    print(f"demo finished in {time.perf_counter() - start:.0f} s on {results['meta']['dataset']}")
    print(f"report:  {Path(args.out).resolve() / 'index.html'}")
    print(f"results: {Path(args.out).resolve() / 'results.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------- conformal
def _add_conformal(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="coverage", help="coverage (pixel sets, image-level coverage risk) or fnr "
                                                        "(one class's mask, false-negative rate)")
    p.add_argument("--alpha", type=float, default=0.1, help="risk level α: E[loss] ≤ α on exchangeable images")
    p.add_argument("--arg", action="append", metavar="K=V", help="controller parameter, e.g. epsilon=0.1, "
                                                                 "class_index=8 (repeatable)")
    p.add_argument("--logits", required=True, help="calibration logits store (labelled; e.g. the val split)")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=STORE",
                   help="held-out labelled store to judge the guarantee on (repeatable)")
    p.add_argument("--calibrator", help="a fitted calibrator file: scores come from its probabilities")
    p.add_argument("--out", help="save the fitted controller here")
    p.add_argument("--json", help="write the evaluation here")


def _run_conformal(args: argparse.Namespace) -> int:
    from segcal.conformal import evaluate, get_controller
    from segcal.data import LogitsStore

    store = LogitsStore(args.logits)
    params: dict[str, Any] = {"ignore_index": store.ignore_index, "alpha": args.alpha, **_key_values(args.arg)}
    if args.calibrator:
        from segcal.calibrators import load as load_calibrator

        params["calibrator"] = load_calibrator(args.calibrator)
    controller = get_controller(args.method, **params)
    evals = {}
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--eval expects NAME=STORE, got {item!r}")
        evals[name] = LogitsStore(path)
    result = evaluate(controller, store, evals, alphas=sorted({0.05, 0.1, 0.2, args.alpha}))
    log.info("%s fitted on %d images: threshold %.6g (risk bound %.4g at α=%g)", type(controller).__name__,
             len(store), controller.threshold_, controller.risk_bound_, args.alpha)
    for name, split in result["splits"].items():
        lo, hi = split["risk_ci"]
        print(f"{name}: risk {split['risk']:.4f} [{lo:.4f}, {hi:.4f}]  meets α: {split['meets_alpha']}  "
              f"mean set size {split['mean_set_size']:.3f}")
    if args.out:
        controller.save(args.out)
    if args.json:
        _write_json(args.json, result)
    return 0


_ADD_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train": _add_train, "predict": _add_predict, "fit": _add_fit, "evaluate": _add_evaluate, "report": _add_report,
    "benchmark": _add_benchmark, "demo": _add_demo, "detect": _add_detect,
    "evaluate-detection": _add_evaluate_detection, "conformal": _add_conformal,
}
_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _run_train, "predict": _run_predict, "fit": _run_fit, "evaluate": _run_evaluate, "report": _run_report,
    "benchmark": _run_benchmark, "demo": _run_demo, "detect": _run_detect,
    "evaluate-detection": _run_evaluate_detection, "conformal": _run_conformal,
}


def _add_verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("-q", "--quiet", action="count", default=default, help="less output (warnings and results only)")
    p.add_argument("-v", "--verbose", action="count", default=default, help="more output (debug messages)")


def build_parser() -> argparse.ArgumentParser:
    from segcal import __version__

    parser = argparse.ArgumentParser(prog="segcal", description="Trustworthy confidence for semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"segcal {__version__}")
    _add_verbosity(parser, 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_verbosity(p, argparse.SUPPRESS)
        if name in _ADD_ARGS:
            _ADD_ARGS[name](p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from segcal._progress import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(int(args.verbose or 0) - int(args.quiet or 0))
    if args.command is None:
        parser.print_help()
        return 0
    handler = _HANDLERS.get(args.command)
    if handler is None:
        print(f"segcal {args.command}: not implemented yet", file=sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        if os.environ.get("SEGCAL_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"segcal {args.command}: error: {message} (SEGCAL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"segcal {args.command}: interrupted; finished work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        _dist_close()
