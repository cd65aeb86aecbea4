"""The main job: logits (cached) → calibrators fit on val → metrics on test, detectors on IDM / pasted anomalies /
corruptions → ``results.json``, ``results.md`` and the HTML report.

``segcal benchmark`` runs the full protocol; ``segcal demo`` the same pipeline on a subset with the quick methods.
Everything is seeded: two runs on the same inputs write identical ``results.json`` (timings are kept out of it and
go to ``timings.json``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from segcal.data.store import LogitsStore
from segcal.data.subset import Subset
from segcal.engine.evaluate import calibration_summary, evaluate_store, to_jsonable
from segcal.engine.inference import predict
from segcal.metrics import CalibrationMetrics, DetectionMetrics

QUICK_CALIBRATORS = ("ts", "vs", "ets", "selective")
ALL_CALIBRATORS = ("ts", "vs", "ms", "dirichlet", "ets", "lts", "histogram", "isotonic", "selective")
QUICK_DETECTORS = ("msp", "max_logit", "entropy", "energy", "sml", "flowenedet-u")
ALL_DETECTORS = ("msp", "max_logit", "entropy", "energy", "sml", "flowenedet-u", "flowenedet-c", "selective")
QUICK_CORRUPTIONS = ("gaussian_noise", "darkness")
ALL_CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "motion_blur", "fog", "brightness", "contrast",
                   "jpeg_compression", "pixelate", "darkness")
#: explicit, seeded pixel subsamples for the L-BFGS calibrators (streaming float64 passes over every pixel are
#: exact but take minutes per method on 17 Mpx of CamVid val; 2 Mpx changes the fitted parameters by < 1e-3)
BENCHMARK_KWARGS: dict[str, dict[str, Any]] = {m: {"max_pixels": 2_000_000, "seed": 0}
                                               for m in ("vs", "ms", "dirichlet", "ets")}
#: the demo: smaller samples and fewer epochs for the learned methods
QUICK_KWARGS: dict[str, dict[str, Any]] = {**{m: {"max_pixels": 300_000, "seed": 0} for m in ("vs", "ms", "dirichlet",
                                                                                              "ets")},
                                           "selective": {"epochs": 8}, "flowenedet-u": {"epochs": 2},
                                           "flowenedet-c": {"epochs": 2}}


@dataclass
class BenchmarkConfig:
    """What :func:`run_benchmark` does. ``n_images`` limits every split to evenly spaced frames (the demo)."""

    out: Path
    model: str = "espnet-camvid"
    dataset: str = "camvid"
    shift_model: str | None = "espnet-cityscapes"
    cache: Path = Path("cache")
    calibrators: Sequence[str] = ALL_CALIBRATORS
    detectors: Sequence[str] = ALL_DETECTORS
    corruptions: Sequence[str] = ALL_CORRUPTIONS
    severities: Sequence[int] = (1, 2, 3, 4, 5)
    n_images: int | None = None
    n_shift_images: int | None = 40
    n_examples: int = 3
    anomalies: bool = True
    pretrained_detectors: bool = False
    shift_calibrators: Sequence[str] | None = None  # calibrators for the second model (None = ``calibrators``)
    checkpoints: Path | None = None
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(BENCHMARK_KWARGS))
    batch_size: int = 4
    seed: int = 0
    progress: bool = True


_T0 = time.perf_counter()


def _log(message: str, cfg: BenchmarkConfig) -> None:
    """Stage messages on stderr (the progress bars only show on a terminal)."""
    if cfg.progress:
        import sys

        print(f"[segcal {time.perf_counter() - _T0:6.0f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ logits
SYNTHETIC_SPLITS = {"train": (0, 48), "val": (48, 72), "test": (72, 96)}


def make_dataset(cfg: BenchmarkConfig, split: str) -> Any:
    """A split of the benchmark's dataset: CamVid, or the clearly labelled synthetic fallback."""
    if cfg.dataset == "camvid":
        from segcal.data import CamVid

        return CamVid(split=split)
    if cfg.dataset == "synthetic":
        from segcal.data import SyntheticSegmentation

        full = SyntheticSegmentation(SYNTHETIC_SPLITS["test"][1], size=(96, 128), num_classes=11, seed=0,
                                     void_fraction=0.05)
        start, stop = SYNTHETIC_SPLITS[split]
        part = Subset(full, range(start, stop))
        part.names, part.split = [full[i]["name"] for i in part.indices], split
        return part
    raise ValueError(f"unknown benchmark dataset {cfg.dataset!r}; choose camvid or synthetic")


def load_model(cfg: BenchmarkConfig, name: str) -> Any:
    """A model by name; ``"synthetic-espnet"`` is an ESPNet trained from scratch on the synthetic train split."""
    from segcal import models

    if name != "synthetic-espnet":
        return models.load(name)
    run = Path(cfg.cache) / "models" / "synthetic-espnet"
    if not (run / "last.pt").is_file():
        from segcal.engine.training import Trainer

        torch.manual_seed(cfg.seed)
        net = models.build_espnet("camvid", num_classes=11, name="synthetic-espnet")
        Trainer(net, None, make_dataset(cfg, "train"), None, out_dir=run, epochs=15, batch_size=8, lr=5e-3,
                seed=cfg.seed, progress=cfg.progress).fit(resume=True)
    return models.load(run / "last.pt")


def cached_store(model: Any, model_name: str, split: str, cfg: BenchmarkConfig, features: bool = True
                 ) -> tuple[LogitsStore, Any]:
    """Predict (or reuse) the logits store of ``model`` on a split, restricted to ``cfg.n_images``."""
    dataset = Subset.evenly_spaced(make_dataset(cfg, split), cfg.n_images)
    tag = split if cfg.n_images is None else f"{split}-n{cfg.n_images}"
    path = Path(cfg.cache) / "logits" / model_name / tag
    store = predict(model, dataset, path, batch_size=cfg.batch_size, features=features, progress=cfg.progress)
    return store, dataset


def _with_images(batches: Callable[[], Iterator[dict]], dataset: Any) -> Callable[[], Iterator[dict]]:
    """Add the RGB images (N,3,H,W float in [0,1]) to store batches, for calibrators that look at the image (LTS)."""
    index = {n: i for i, n in enumerate(dataset.names)}

    def gen() -> Iterator[dict]:
        for batch in batches():
            imgs = np.stack([dataset[index[n]]["image"] for n in batch["names"]])
            batch["images"] = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
            yield batch

    return gen


# ------------------------------------------------------------------------------------------------- calibration
def fit_calibrators(names: Sequence[str], store: LogitsStore, dataset: Any, cfg: BenchmarkConfig,
                    store_names: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit each calibrator on (part of) a store. Returns ``{name: fitted}`` and fit times in seconds."""
    from segcal.calibrators import get_calibrator

    fitted, times = {}, {}
    for name in names:
        cal = get_calibrator(name, **cfg.method_kwargs.get(name, {}))
        source = lambda: store.batches(cfg.batch_size, names=store_names)  # noqa: E731
        if name == "lts":
            source = _with_images(source, dataset)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        cal.fit(source)
        times[name] = time.perf_counter() - start
        fitted[name] = cal
    return fitted, times


def _transform(cal: Any, dataset: Any) -> Callable[[Tensor, Sequence[str]], Tensor]:
    needs_images = type(cal).__name__ == "LocalTemperatureScaling"
    index = {n: i for i, n in enumerate(dataset.names)} if needs_images else {}

    def apply(logits: Tensor, names: Sequence[str]) -> Tensor:
        if needs_images:
            imgs = np.stack([dataset[index[n]]["image"] for n in names])
            images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
            return cal.transform(logits, images=images)
        return cal.transform(logits)

    return apply


def evaluate_calibrators(store: LogitsStore, dataset: Any, calibrators: dict[str, Any], cfg: BenchmarkConfig,
                         names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Uncalibrated + every calibrator on ``store`` (restricted to ``names``) in one pass over the logits."""
    return evaluate_calibrators_on_sets(store, dataset, calibrators, cfg, {"_": names})["_"]


def _set_members(sets: dict[str, Sequence[str] | None]) -> dict[str, set[str] | None]:
    return {k: None if v is None else set(v) for k, v in sets.items()}


def _rows(batch_names: Sequence[str], members: set[str] | None) -> Tensor | None:
    """Indices of the batch's images in an evaluation set (None = all of them, empty tensor = none)."""
    if members is None:
        return None
    return torch.tensor([i for i, n in enumerate(batch_names) if n in members], dtype=torch.long)


def evaluate_calibrators_on_sets(store: LogitsStore, dataset: Any, calibrators: dict[str, Any],
                                 cfg: BenchmarkConfig, sets: dict[str, Sequence[str] | None]
                                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """Like :func:`evaluate_calibrators` for several image sets (e.g. test and its sequences) in a single pass:
    every calibrator transforms each batch once and the result is routed to the sets holding its images."""
    methods = {"uncalibrated": None, **calibrators}
    members = _set_members(sets)
    wanted = None if any(m is None for m in members.values()) else sorted(set().union(*members.values()))
    metrics = {k: {m: CalibrationMetrics(store.num_classes, n_bins=15, boundary_width=2) for m in methods}
               for k in sets}
    split = {k: {m: (CalibrationMetrics(store.num_classes, n_bins=15, classwise=False),
                     CalibrationMetrics(store.num_classes, n_bins=15, classwise=False)) for m in methods}
             for k in sets}
    transforms = {m: _transform(c, dataset) for m, c in calibrators.items()}
    with torch.inference_mode():
        for batch in store.batches(cfg.batch_size, names=wanted):
            logits, target = batch["logits"], batch["target"]
            pred = logits.argmax(1)
            valid = target != 255
            correct_t = torch.where(valid & (pred == target), target, 255)
            wrong_t = torch.where(valid & (pred != target), target, 255)
            outs = {m: logits if m == "uncalibrated" else transforms[m](logits, batch["names"]) for m in methods}
            for k, member in members.items():
                rows = _rows(batch["names"], member)
                if rows is not None and rows.numel() == 0:
                    continue
                pick = (lambda x: x) if rows is None else (lambda x, r=rows: x[r])
                for m in methods:
                    metrics[k][m].update(pick(outs[m]), pick(target))
                    split[k][m][0].update(pick(outs[m]), pick(correct_t))
                    split[k][m][1].update(pick(outs[m]), pick(wrong_t))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for k in sets:
        results[k] = {}
        for m in methods:
            res = calibration_summary(metrics[k][m])
            res["per_class_ece"] = res.pop("cw_ece_per_class", None)
            res["ece_correct"] = to_jsonable(split[k][m][0].compute()["ece"])
            res["ece_wrong"] = to_jsonable(split[k][m][1].compute()["ece"])
            results[k][m] = {key: v for key, v in res.items() if v is not None}
    return results


def evaluate_checkpoints(cfg: BenchmarkConfig) -> dict[str, dict[str, Any]]:
    """Every ``<checkpoints>/<run>/last.pt`` (from ``segcal train``): test metrics as trained and after TS on val."""
    from segcal import models

    rows: dict[str, dict[str, Any]] = {}
    runs = sorted(p.parent for p in Path(cfg.checkpoints).glob("*/last.pt"))
    if not runs:
        raise FileNotFoundError(f"no <run>/last.pt checkpoints under {cfg.checkpoints}")
    for run in runs:
        model = models.load(run / "last.pt")
        val_store, val_set = cached_store(model, f"ckpt-{run.name}", "val", cfg, features=False)
        test_store, test_set = cached_store(model, f"ckpt-{run.name}", "test", cfg, features=False)
        cals, _ = fit_calibrators(["ts"], val_store, val_set, cfg)
        res = evaluate_calibrators(test_store, test_set, cals, cfg)
        rows[run.name] = res["uncalibrated"]
        rows[f"{run.name} + TS"] = res["ts"]
    return rows


# ---------------------------------------------------------------------------------------------------- detection
def fit_detectors(names: Sequence[str], fit_store: LogitsStore, sml_store: LogitsStore | None,
                  cfg: BenchmarkConfig, selective: Any = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit the learned detectors: SML statistics on training logits (shared with FlowEneDet's input transform, as
    in both papers), FlowEneDet on validation logits + features (never test)."""
    from segcal.detectors import StandardizedMaxLogit, fit_sml_statistics, get_detector

    fitted, times = {}, {}
    stats = None
    for name in names:
        start = time.perf_counter()
        if name == "selective":
            if selective is None:
                continue
            fitted[name] = get_detector(name, calibrator=selective)
        elif cfg.pretrained_detectors and (shipped := _shipped_detector(name, cfg.model)) is not None:
            fitted[name] = shipped
        elif name == "sml" or name.startswith("flowenedet"):
            if stats is None and sml_store is not None:
                stats = fit_sml_statistics(lambda: sml_store.batches(cfg.batch_size))
            if name == "sml":
                fitted[name] = StandardizedMaxLogit(stats.class_mean_, stats.class_std_)
            else:
                torch.manual_seed(cfg.seed)
                det = get_detector(name, sml=stats, **cfg.method_kwargs.get(name, {}))
                fitted[name] = det.fit(lambda: fit_store.batches(cfg.batch_size, features=True))
        else:
            fitted[name] = get_detector(name, **cfg.method_kwargs.get(name, {}))
        times[name] = time.perf_counter() - start
    return fitted, times


def _shipped_detector(name: str, model: str) -> Any:
    """The detector fitted for ``model`` that ships with segcal (``segcal/assets``), or None."""
    from segcal import detectors

    try:
        if name == "sml":
            return detectors.load_pretrained_sml(model)
        if name.startswith("flowenedet-"):
            return detectors.load_pretrained(model, variant=name[-1])
    except FileNotFoundError:
        return None
    return None


def _new_detection_metrics(per_image: bool) -> DetectionMetrics:
    return DetectionMetrics(per_image=per_image)


def detection_summary(metric: DetectionMetrics) -> dict[str, Any]:
    out = {k: to_jsonable(v) for k, v in metric.compute().items()}
    curves = metric.curves()
    roc_idx = _thin_index(len(curves["fpr"]))
    pr_idx = _thin_index(len(curves["recall"]))
    out["roc"] = [to_jsonable(curves["fpr"][roc_idx]), to_jsonable(curves["tpr"][roc_idx])]
    out["pr"] = [to_jsonable(curves["recall"][pr_idx]), to_jsonable(curves["precision"][pr_idx])]
    return out


def _thin_index(n: int, keep: int = 200) -> Tensor:
    """Indices of at most ``keep`` evenly spaced curve points (first and last kept) for plotting."""
    return torch.linspace(0, max(n - 1, 0), min(n, keep)).round().long()


def evaluate_idm(store: LogitsStore, detectors: dict[str, Any], cfg: BenchmarkConfig,
                 names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """In-distribution misprediction detection: positive = ``argmax ≠ label`` on valid pixels, per image + pooled."""
    return evaluate_idm_on_sets(store, detectors, cfg, {"_": names})["_"]


def evaluate_idm_on_sets(store: LogitsStore, detectors: dict[str, Any], cfg: BenchmarkConfig,
                         sets: dict[str, Sequence[str] | None]) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`evaluate_idm` for several image sets in one pass (each detector scores each batch once)."""
    members = _set_members(sets)
    wanted = None if any(m is None for m in members.values()) else sorted(set().union(*members.values()))
    metrics = {k: {d: _new_detection_metrics(per_image=True) for d in detectors} for k in sets}
    with torch.inference_mode():
        for batch in store.batches(cfg.batch_size, names=wanted, features=store.has_features):
            logits, target = batch["logits"], batch["target"]
            valid = target != 255
            positive = (logits.argmax(1) != target) & valid
            scores = {d: det.score(logits, features=batch.get("features")) for d, det in detectors.items()}
            for k, member in members.items():
                rows = _rows(batch["names"], member)
                if rows is not None and rows.numel() == 0:
                    continue
                for d in detectors:
                    if rows is None:
                        metrics[k][d].update(scores[d], positive, valid)
                    else:
                        metrics[k][d].update(scores[d][rows], positive[rows], valid[rows])
    return {k: {d: detection_summary(m) for d, m in per.items()} for k, per in metrics.items()}


def _model_batches(model: Any, dataset: Any, batch_size: int, desc: str, progress: bool
                   ) -> Iterator[tuple[list[dict], Tensor, Tensor]]:
    """Run the model on a dataset on the fly (for protocols whose inputs are not cached)."""
    with torch.inference_mode():
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, disable=not progress, leave=False):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = np.stack([s["image"] for s in samples])
            logits, feats = model.predict_batch(images, features=True)
            yield samples, logits.float(), feats.float()


def evaluate_anomalies(model: Any, test_set: Any, detectors: dict[str, Any], cfg: BenchmarkConfig
                       ) -> dict[str, dict[str, Any]]:
    """Pasted-anomaly OOD protocol: positive = pasted object pixels, negatives = valid in-distribution pixels.

    Besides AUROC / AP / FPR95 (pooled), each detector gets the open-set mIoU of FlowEneDet's protocol: pixels whose
    score reaches the F1-optimal threshold become an extra "unknown" class. The score maps of the (few) protocol
    frames are kept in memory for that second step.
    """
    from segcal.data.anomalies import PastedAnomalyDataset
    from segcal.metrics.open_set import f1_optimal_threshold, open_set_miou

    dataset = PastedAnomalyDataset(Subset.evenly_spaced(test_set, cfg.n_shift_images), seed=cfg.seed)
    metrics = {d: _new_detection_metrics(per_image=False) for d in detectors}
    kept: dict[str, list[Tensor]] = {d: [] for d in detectors}
    preds, targets, oods = [], [], []
    for samples, logits, feats in _model_batches(model, dataset, cfg.batch_size, "pasted anomalies", cfg.progress):
        ood = torch.from_numpy(np.stack([s["ood_mask"] for s in samples]))
        target = torch.from_numpy(np.stack([s["target"] for s in samples]))
        valid = ood | (target != 255)
        preds.append(logits.argmax(1))
        targets.append(target)
        oods.append(ood)
        for d, det in detectors.items():
            score = det.score(logits, features=feats)
            metrics[d].update(score, ood, valid)
            kept[d].append(score.float())
    pred, target, ood = torch.cat(preds), torch.cat(targets), torch.cat(oods)
    valid = ood | (target != 255)
    out = {}
    for d, m in metrics.items():
        out[d] = detection_summary(m)
        score = torch.cat(kept[d])
        threshold = f1_optimal_threshold(score[valid], ood[valid])
        miou = open_set_miou(pred, target, ood, score >= threshold, model.num_classes)
        out[d].update({k: to_jsonable(v) for k, v in miou.items()})
    return out


def evaluate_corruptions(model: Any, test_set: Any, detectors: dict[str, Any], calibrators: dict[str, Any],
                         cfg: BenchmarkConfig) -> dict[str, dict[str, dict[str, float]]]:
    """ECE (uncalibrated and per calibrator) and IDM AUROC per detector, per corruption and severity."""
    from segcal.data.corruptions import CorruptedDataset

    base = Subset.evenly_spaced(test_set, cfg.n_shift_images)
    clean = _shift_point(model, base, detectors, calibrators, cfg, "clean")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for corruption in cfg.corruptions:
        out[corruption] = {"0": clean}
        for severity in cfg.severities:
            data = CorruptedDataset(base, corruption, severity, seed=cfg.seed)
            out[corruption][str(severity)] = _shift_point(model, data, detectors, calibrators, cfg,
                                                          f"{corruption}-{severity}")
    return out


def _shift_point(model: Any, dataset: Any, detectors: dict[str, Any], calibrators: dict[str, Any],
                 cfg: BenchmarkConfig, desc: str) -> dict[str, float]:
    cal_metrics = {m: CalibrationMetrics(11, n_bins=15, classwise=False) for m in ("uncalibrated", *calibrators)}
    det_metrics = {d: _new_detection_metrics(per_image=False) for d in detectors}
    for samples, logits, feats in _model_batches(model, dataset, cfg.batch_size, desc, cfg.progress):
        target = torch.from_numpy(np.stack([s["target"] for s in samples]))
        valid = target != 255
        positive = (logits.argmax(1) != target) & valid
        for m, metric in cal_metrics.items():
            metric.update(logits if m == "uncalibrated" else calibrators[m].transform(logits), target)
        for d, det in detectors.items():
            det_metrics[d].update(det.score(logits, features=feats), positive, valid)
    point: dict[str, float] = {}
    for m, metric in cal_metrics.items():
        values = metric.compute()
        point[f"ECE {m}"] = to_jsonable(values["ece"])
        if m == "uncalibrated":
            point["mIoU"] = to_jsonable(values["miou"])
    for d, metric in det_metrics.items():
        point[f"IDM AUROC {d}"] = to_jsonable(metric.compute()["auroc"])
    return point


# ----------------------------------------------------------------------------------------------------- examples
def _colormap(values: np.ndarray, cmap: str = "magma") -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[cmap](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def _rank_normalise(score: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(score, [1, 99])
    return (score - lo) / max(hi - lo, 1e-12)


def write_examples(store: LogitsStore, dataset: Any, detectors: dict[str, Any], out: Path, n: int
                   ) -> list[dict[str, Any]]:
    """PNG panels for a few test images: image, ground truth, prediction, confidence, errors, detector scores."""
    from PIL import Image

    from segcal.data import colorize

    if n <= 0:
        return []
    folder = out / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    picks = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    examples = []
    for i in picks:
        sample = dataset[int(i)]
        name = sample["name"]
        entry = store.get(name)
        logits = entry.logits.float()[None]
        feats = entry.features.float()[None] if getattr(entry, "features", None) is not None else None
        probs = logits.softmax(1)[0]
        conf, pred = probs.max(0)
        target = sample["target"]
        error = (pred.numpy() != target) & (target != 255)
        panels = {"image": sample["image"], "ground truth": colorize(target), "prediction": colorize(pred.numpy()),
                  "confidence (max softmax)": _colormap(conf.numpy(), "viridis"),
                  "errors (white)": np.repeat((error * 255).astype(np.uint8)[..., None], 3, axis=2)}
        with torch.inference_mode():
            for d, det in detectors.items():
                score = det.score(logits, features=feats)[0].numpy()
                panels[f"score: {d}"] = _colormap(_rank_normalise(score))
        rel = {}
        for title, img in panels.items():
            safe = "".join(ch if ch.isalnum() else "_" for ch in title)
            path = folder / f"{name}_{safe}.png"
            Image.fromarray(img).resize((240, 180), Image.NEAREST).save(path)
            rel[title] = str(path.relative_to(out))
        examples.append({"name": name, "panels": rel})
    return examples


# --------------------------------------------------------------------------------------------------- orchestration
def _markdown(results: dict[str, Any]) -> str:
    lines = [f"# segcal results — {results['meta']['model']} on {results['meta']['dataset']}", ""]
    cols = ("ece", "mce", "ace", "cw_ece", "nll", "brier", "oe", "boundary_ece", "interior_ece", "miou",
            "ece_correct", "ece_wrong")
    for eval_set, methods in results.get("calibration", {}).items():
        lines += [f"## Calibration — {eval_set}", "", "| method | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for m, r in methods.items():
            lines.append(f"| {m} | " + " | ".join(_md_num(r.get(c)) for c in cols) + " |")
        lines.append("")
    dcols = ("auroc", "ap", "fpr95", "auroc_per_image", "ap_per_image", "fpr95_per_image", "open_set_miou")
    for protocol, dets in results.get("detection", {}).items():
        lines += [f"## Detection — {protocol}", "", "| detector | " + " | ".join(dcols) + " |",
                  "|---" * (len(dcols) + 1) + "|"]
        for d, r in dets.items():
            lines.append(f"| {d} | " + " | ".join(_md_num(r.get(c)) for c in dcols) + " |")
        lines.append("")
    shift = results.get("shift") or {}
    if shift:
        keys = sorted({k for by_sev in shift.values() for v in by_sev.values() for k in v})
        lines += ["## Corruptions (mean over corruptions per severity)", "",
                  "| severity | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        sevs = sorted({int(s) for by_sev in shift.values() for s in by_sev})
        for s in sevs:
            vals = [[by_sev[str(s)][k] for by_sev in shift.values() if str(s) in by_sev and
                     by_sev[str(s)].get(k) is not None] for k in keys]
            lines.append(f"| {s} | " + " | ".join(_md_num(float(np.mean(v)) if v else None) for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def _md_num(v: Any) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the whole protocol and write ``results.json``, ``results.md``, ``timings.json`` and ``index.html``."""
    from segcal.report import render_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    dataset_label = "CamVid" if cfg.dataset == "camvid" else "SYNTHETIC blobs (no real data found)"
    model = load_model(cfg, cfg.model)
    timings: dict[str, Any] = {}
    _log(f"logits of {cfg.model} on val / test / train (cached under {cfg.cache})", cfg)
    val_store, val_set = cached_store(model, cfg.model, "val", cfg)
    test_store, test_set = cached_store(model, cfg.model, "test", cfg)
    needs_train = any(d == "sml" or d.startswith("flowenedet") for d in cfg.detectors
                      if not (cfg.pretrained_detectors and _shipped_detector(d, cfg.model)))
    train_store = cached_store(model, cfg.model, "train", cfg, features=False)[0] if needs_train else None

    _log(f"fitting calibrators {list(cfg.calibrators)} on val", cfg)
    calibrators, timings["calibrator_fit_s"] = fit_calibrators(cfg.calibrators, val_store, val_set, cfg)
    _log("calibration metrics on test and its sequences", cfg)
    calibration: dict[str, Any] = {}
    calibration.update(evaluate_calibrators_on_sets(test_store, test_set, calibrators, cfg, _test_sets(test_store)))
    for m, t in timings["calibrator_fit_s"].items():
        calibration["test (all)"][m]["fit_images"] = len(val_store)
        _ = t  # fit times go to timings.json: wall-clock is not deterministic

    if cfg.shift_model:
        _log(f"shift case: {cfg.shift_model} on CamVid", cfg)
        shift_model = load_model(cfg, cfg.shift_model)
        s_val, s_val_set = cached_store(shift_model, cfg.shift_model, "val", cfg, features=False)
        s_test, s_test_set = cached_store(shift_model, cfg.shift_model, "test", cfg, features=False)
        quick = [c for c in (cfg.shift_calibrators or cfg.calibrators) if c != "lts"]
        s_cals, timings["shift_calibrator_fit_s"] = fit_calibrators(quick, s_val, s_val_set, cfg)
        calibration[f"shift: {cfg.shift_model} → CamVid test"] = evaluate_calibrators(s_test, s_test_set, s_cals,
                                                                                       cfg)

    if cfg.checkpoints is not None:
        calibration["train-time losses on CamVid test (each + TS fit on val)"] = evaluate_checkpoints(cfg)

    _log(f"fitting detectors {list(cfg.detectors)}; IDM on test", cfg)
    detectors, timings["detector_fit_s"] = fit_detectors(cfg.detectors, val_store, train_store, cfg,
                                                         selective=calibrators.get("selective"))
    seqs = _sequences(test_store)
    idm_sets: dict[str, Sequence[str] | None] = {f"IDM: {dataset_label} test (positive = mispredicted pixel)": None}
    for seq, names in (seqs.items() if len(seqs) > 1 else ()):
        idm_sets[f"IDM: {dataset_label} test {seq}"] = names
    detection = evaluate_idm_on_sets(test_store, detectors, cfg, idm_sets)
    if cfg.anomalies:
        _log("pasted-anomaly OOD protocol", cfg)
        ood_key = f"OOD: pasted anomalies on {dataset_label} test"
        detection[ood_key] = evaluate_anomalies(model, test_set, detectors, cfg)
    _log(f"corruptions {list(cfg.corruptions)} at severities {list(cfg.severities)}", cfg)
    shift = evaluate_corruptions(model, test_set, detectors, {k: v for k, v in calibrators.items()
                                                              if k in ("ts", "selective")}, cfg) \
        if cfg.corruptions else {}

    from segcal.data import CAMVID_CLASSES

    results = {
        "meta": {"model": cfg.model, "dataset": dataset_label,
                 "calibration fit": f"{dataset_label} val ({len(val_store)} images)",
                 "evaluation": f"{dataset_label} test ({len(test_store)} images)", "n_bins": 15, "seed": cfg.seed,
                 "shift images": cfg.n_shift_images, "segcal_version": _version()},
        "class_names": list(CAMVID_CLASSES) if cfg.dataset == "camvid" else [f"class {k}" for k in range(11)],
        "config": to_jsonable({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                               if k not in ("out", "cache", "progress")}),
        "calibration": calibration,
        "detection": detection,
        "shift": shift,
        "examples": write_examples(test_store, test_set, detectors, out, cfg.n_examples),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(_markdown(results))
    (out / "timings.json").write_text(json.dumps(to_jsonable(timings), indent=1))
    render_report(out)
    _log(f"wrote {out / 'results.json'} and {out / 'index.html'}", cfg)
    return results


def _test_sets(store: LogitsStore) -> dict[str, list[str] | None]:
    sets: dict[str, list[str] | None] = {"test (all)": None}
    seqs = _sequences(store)
    for seq, names in (seqs.items() if len(seqs) > 1 else ()):
        sets[f"test {seq}"] = names
    return sets


def _sequences(store: LogitsStore) -> dict[str, list[str]]:
    from segcal.data import sequence_of

    seqs: dict[str, list[str]] = {}
    for n in store.names:
        seqs.setdefault(sequence_of(n), []).append(n)
    labels = {"0001TP": "0001TP (dusk)", "Seq05VD": "Seq05VD (unseen sequence)"}
    return {labels.get(k, k): v for k, v in seqs.items()}


def _version() -> str:
    from segcal import __version__

    return __version__


def real_data_available() -> bool:
    """True when ``$SEGCAL_DATA`` holds CamVid and the ESPNet weights."""
    import os

    root = Path(os.environ.get("SEGCAL_DATA", "../shared/data"))
    return (root / "camvid" / "val").is_dir() and (root / "espnet_pretrained").is_dir()


def demo_config(out: Path, n_images: int = 16, synthetic: bool | None = None) -> BenchmarkConfig:
    """The README's first command: the benchmark on a subset with the quick methods (minutes, not hours).

    Without real data (or with ``synthetic=True``) it runs on SYNTHETIC blobs with an ESPNet trained from scratch
    for a minute — every number is then about that toy task, and the report says so.
    """
    if synthetic is None:
        synthetic = not real_data_available()
    if synthetic:
        return BenchmarkConfig(out=out, model="synthetic-espnet", dataset="synthetic", shift_model=None,
                               n_images=None, n_shift_images=8, calibrators=QUICK_CALIBRATORS,
                               detectors=QUICK_DETECTORS, corruptions=QUICK_CORRUPTIONS, severities=(1, 3, 5),
                               method_kwargs=QUICK_KWARGS, n_examples=2, anomalies=False)
    return BenchmarkConfig(out=out, n_images=n_images, n_shift_images=8, calibrators=QUICK_CALIBRATORS,
                           detectors=QUICK_DETECTORS, corruptions=QUICK_CORRUPTIONS, severities=(1, 3, 5),
                           shift_model="espnet-cityscapes", method_kwargs=QUICK_KWARGS, n_examples=2,
                           pretrained_detectors=True)


__all__ = ["BenchmarkConfig", "demo_config", "evaluate_store", "make_dataset", "real_data_available", "run_benchmark"]
