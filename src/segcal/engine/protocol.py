"""The protocol: one dataset-agnostic pipeline from a model and labelled data to ``results.json`` and a report.

predict (cached logits stores) → fit calibrators on the fit split → calibration metrics on every evaluation split and
its named subsets → detectors (error detection; OOD with pasted anomalies when asked) → optional corruptions and
shift models → ``results.json`` (written first) → ``results.md``, example panels and the HTML report.

Nothing here knows a dataset or a method by name. The class count, class names and ``ignore_index`` come from the
model and the data (recorded in each logits-store manifest and read back from it); named subsets (e.g. CamVid's
sequences), a default model, shift models and the drivable-ground classes used to place pasted anomalies are
declared by the dataset; a method tells the protocol what it needs (``needs_images``, ``needs_features``,
``requires_fit``) and is found by its registry name. ``segcal benchmark`` and ``segcal demo`` are configurations of
:func:`run_benchmark`.

Everything is seeded: two runs on the same inputs write identical ``results.json`` (timings go to
``timings.json``). The ``results.json`` layout is documented in ``docs/engine.md`` (schema ``RESULTS_SCHEMA``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from segcal._progress import progress_bar
from segcal.data.store import DEFAULT_IGNORE_INDEX, LogitsStore
from segcal.data.subset import Subset
from segcal.engine.evaluate import calibration_summary, images_of, to_jsonable
from segcal.engine.inference import predict
from segcal.metrics import CalibrationMetrics, DetectionMetrics

log = logging.getLogger("segcal")

RESULTS_SCHEMA = "segcal.results/2"

QUICK_CALIBRATORS = ("ts", "vs", "ets", "isotonic", "selective")
QUICK_DETECTORS = ("msp", "max_logit", "entropy", "energy", "sml", "flowenedet-u")
QUICK_CORRUPTIONS = ("gaussian_noise", "darkness")
ALL_CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "motion_blur", "fog", "brightness", "contrast",
                   "jpeg_compression", "pixelate", "darkness")
#: explicit, seeded pixel subsamples for the L-BFGS calibrators (streaming float64 passes over every pixel are
#: exact but take minutes per method on 17 Mpx of CamVid val; 2 Mpx changes the fitted parameters by < 1e-3)
# MS and Dirichlet: 500k pixels and a gradient tolerance of 1e-4 give the test ECE / NLL of 1000 L-BFGS iterations
# (to 0.0002 / 0.0001; 2M pixels: 0.0004 / 0.002 better) in 41 s and 164 s, not ~25 and ~17 min (docs/calibrators.md)
BENCHMARK_KWARGS: dict[str, dict[str, Any]] = {**{m: {"max_pixels": 2_000_000, "seed": 0} for m in ("vs", "ets")},
                                               **{m: {"max_pixels": 500_000, "tol": 1e-4, "seed": 0}
                                                  for m in ("ms", "dirichlet")}}
#: the demo: smaller samples and fewer epochs for the learned methods
QUICK_KWARGS: dict[str, dict[str, Any]] = {**{m: {"max_pixels": 300_000, "seed": 0} for m in ("vs", "ms", "dirichlet",
                                                                                              "ets")},
                                           "selective": {"epochs": 8}, "flowenedet-u": {"epochs": 2},
                                           "flowenedet-c": {"epochs": 2}}


def all_calibrators() -> tuple[str, ...]:
    """Registry names of every calibrator (including ones registered by user code)."""
    from segcal.calibrators import CALIBRATORS

    return tuple(CALIBRATORS)


def all_detectors() -> tuple[str, ...]:
    """Registry names of every detector (including ones registered by user code)."""
    from segcal.detectors import DETECTORS

    return tuple(DETECTORS)


@dataclass
class BenchmarkConfig:
    """What :func:`run_benchmark` does.

    Attributes:
        out: results folder.
        model: model spec (see :func:`segcal.models.load`); ``None`` = the dataset's ``default_model``.
        data: data spec (see :func:`segcal.data.load_dataset`): ``camvid``, ``synthetic`` or a folder root.
        fit_split, eval_splits: the split calibrators and detectors are fitted on, and the splits evaluated.
        ignore_index: void label of the data (``None``: every label is a class); carried into every store.
        preprocess, device: passed to :func:`segcal.models.load`.
        calibrators, detectors: registry names (``None`` = every registered one).
        corruptions, severities: corruption protocol on the first evaluation split (empty = skipped).
        anomalies: run the pasted-anomaly OOD protocol on the first evaluation split.
        shift_models: other models evaluated on the same data (``None`` = the dataset's declared ones).
        n_images: evenly spaced images per split (``None`` = all); n_shift_images: images for the corruption and
            anomaly protocols.
        n_bins, boundary_width: metric settings.
        pretrained_detectors: use a detector's shipped fit for this model when it has one.
        method_kwargs: hyperparameters per method name.
        bootstrap_resamples: paired bootstrap resamples over images for the report's claims (0 = none).
        conformal: conformal risk controllers to fit on the fit split and judge on the evaluation splits, as
            ``{label: {"method": "coverage" | "fnr", **controller params}}`` (see :mod:`segcal.conformal`).
        store_dtype: logits kept as ``float32`` (metrics equal a direct computation from the model) or ``float16``.
    """

    out: Path
    model: str | None = None
    data: str = "camvid"
    fit_split: str = "val"
    eval_splits: Sequence[str] = ("test",)
    ignore_index: int | None = DEFAULT_IGNORE_INDEX
    preprocess: str = "imagenet"
    device: str | None = None
    calibrators: Sequence[str] | None = None
    detectors: Sequence[str] | None = None
    corruptions: Sequence[str] = ALL_CORRUPTIONS
    severities: Sequence[int] = (1, 2, 3, 4, 5)
    anomalies: bool = True
    shift_models: Sequence[str] | None = None
    shift_calibrators: Sequence[str] | None = None
    n_images: int | None = None
    n_shift_images: int | None = 40
    n_examples: int = 3
    n_bins: int = 15
    boundary_width: int = 2
    pretrained_detectors: bool = False
    checkpoints: Path | None = None
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(BENCHMARK_KWARGS))
    bootstrap_resamples: int = 1000
    conformal: dict[str, dict[str, Any]] = field(default_factory=dict)
    store_dtype: str = "float32"
    batch_size: int = 4
    cache: Path = Path("cache")
    seed: int = 0
    progress: bool = True


_T0 = time.perf_counter()


def _stage(message: str) -> None:
    log.info("[%6.0fs] %s", time.perf_counter() - _T0, message)


# ------------------------------------------------------------------------------------------------- models and data
@dataclass
class _Run:
    """What one run resolved: the model, its name, datasets per split and their stores."""

    model: Any
    spec: str
    datasets: dict[str, Any] = field(default_factory=dict)
    stores: dict[str, LogitsStore] = field(default_factory=dict)


def load_model(cfg: BenchmarkConfig, spec: str) -> Any:
    """The model of ``spec`` with the run's preprocessing and device."""
    from segcal import models

    return models.load(spec, preprocess=cfg.preprocess, device=cfg.device)


def make_dataset(cfg: BenchmarkConfig, split: str, num_classes: int | None = None) -> Any:
    """A split of the run's data with the run's ``ignore_index``, limited to ``cfg.n_images`` evenly spaced images
    (``num_classes``: the model's, for data that adapts to it such as the synthetic set)."""
    from segcal.data import load_dataset

    dataset = load_dataset(cfg.data, split, ignore_index=cfg.ignore_index, num_classes=num_classes)
    return Subset.evenly_spaced(dataset, cfg.n_images) if cfg.n_images is not None else dataset


def resolve_model_spec(cfg: BenchmarkConfig) -> str:
    """``cfg.model``, or the dataset's declared default model."""
    if cfg.model:
        return cfg.model
    from segcal.data import load_dataset

    default = getattr(load_dataset(cfg.data, cfg.fit_split, ignore_index=cfg.ignore_index), "default_model", None)
    if not default:
        raise ValueError(f"data {cfg.data!r} declares no default model: give --model SPEC")
    return str(default)


def _slug(text: str) -> str:
    short = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name or text)[:40]
    return f"{short}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def cached_store(model: Any, spec: str, dataset: Any, split: str, cfg: BenchmarkConfig, features: bool = False,
                 ) -> LogitsStore:
    """Predict (or reuse) the logits store of ``model`` on one split of the run's data."""
    tag = (split if cfg.n_images is None else f"{split}-n{cfg.n_images}") + f"-{cfg.store_dtype}"
    ignore = "none" if cfg.ignore_index is None else str(cfg.ignore_index)
    path = Path(cfg.cache) / "logits" / _slug(spec) / _slug(f"{cfg.data}|ignore={ignore}") / tag
    with_features = path.with_name(path.name + "-features")
    if features:
        path = with_features
    elif not path.exists() and (with_features / "manifest.json").is_file():
        # a complete store with features holds the same logits: reuse it rather than predicting again
        store, wanted = LogitsStore(with_features), getattr(dataset, "names", None)
        if wanted is not None and sorted(map(str, wanted)) == sorted(store.names):
            return store
    return predict(model, dataset, path, batch_size=cfg.batch_size, features=features, progress=cfg.progress,
                   logits_dtype=cfg.store_dtype)


def _model_has_features(model: Any) -> bool:
    return getattr(model, "feature_channels", None) is not None or hasattr(model, "forward_with_features")


def store_source(store: LogitsStore, cfg: BenchmarkConfig, *, dataset: Any = None, images: bool = False,
                 features: bool = False, names: Sequence[str] | None = None) -> Callable[[], Iterator[dict]]:
    """A re-iterable batch source over a store: dicts with logits, target, names (+ images / features)."""

    def gen() -> Iterator[dict]:
        for batch in store.batches(cfg.batch_size, names=names, features=features):
            if images:
                batch["images"] = images_of(dataset, batch["names"])
            yield batch

    return gen


# ------------------------------------------------------------------------------------------------------ calibration
def _needs(method: Any, what: str) -> bool:
    return bool(getattr(method, what, False))


def build_method(registry: Any, name: str, ignore_index: int | None, kwargs: dict[str, Any] | None = None) -> Any:
    """An unfitted method from a registry, given the data's ``ignore_index`` when its constructor takes one."""
    import inspect

    cls = registry.resolve(name)
    params = dict(kwargs or {})
    if "ignore_index" in inspect.signature(cls).parameters:
        params.setdefault("ignore_index", ignore_index)
    return cls(**params)


def fit_calibrators(names: Sequence[str], store: LogitsStore, dataset: Any, cfg: BenchmarkConfig,
                    images: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit each named calibrator on a store (``images``: only these of its images, e.g. a fit part of a split).
    Returns ``{name: fitted}`` and fit times in seconds."""
    from segcal.calibrators import CALIBRATORS

    fitted, times = {}, {}
    for name in names:
        cal = build_method(CALIBRATORS, name, store.ignore_index, cfg.method_kwargs.get(name))
        source = store_source(store, cfg, dataset=dataset, images=_needs(cal, "needs_images"), names=images)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        cal.fit(source)
        times[name] = time.perf_counter() - start
        fitted[name] = cal
        _stage(f"fitted {name} in {times[name]:.1f} s")
    return fitted, times


def _apply(cal: Any, logits: Tensor, dataset: Any, names: Sequence[str], images: Tensor | None = None) -> Tensor:
    if _needs(cal, "needs_images"):
        return cal.transform(logits, images=images if images is not None else images_of(dataset, names))
    return cal.transform(logits)


def _rows(batch_names: Sequence[str], members: set[str] | None) -> Tensor | None:
    """Indices of the batch's images in an evaluation set (None = all of them, empty tensor = none)."""
    if members is None:
        return None
    return torch.tensor([i for i, n in enumerate(batch_names) if n in members], dtype=torch.long)


def _metric(store: LogitsStore, cfg: BenchmarkConfig, **kwargs: Any) -> CalibrationMetrics:
    return CalibrationMetrics(store.num_classes, n_bins=cfg.n_bins, ignore_index=store.ignore_index, **kwargs)


def _image_states(store: LogitsStore, cfg: BenchmarkConfig) -> Any:
    """Per-image histograms for the paired bootstrap over images (None when disabled)."""
    if cfg.bootstrap_resamples <= 0:
        return None
    from segcal.metrics import PerImageCalibrationStats

    return PerImageCalibrationStats(store.num_classes, n_bins=cfg.n_bins, ignore_index=store.ignore_index)


def evaluate_calibrators_on_sets(store: LogitsStore, dataset: Any, calibrators: dict[str, Any],
                                 cfg: BenchmarkConfig, sets: dict[str, Sequence[str] | None]
                                 ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Uncalibrated + every calibrator on several image sets of ``store`` (e.g. test and its subsets) in one pass.

    Every calibrator transforms each batch once; the result is routed to the sets holding its images. Besides the
    full metric suite, ECE is reported on the correctly and on the wrongly predicted pixels separately (the
    Selective-Scaling paper's analysis). Returns the per-set results and, per set, bootstrap comparisons of each
    calibrator against the uncalibrated logits (empty when disabled).
    """
    methods = {"uncalibrated": None, **calibrators}
    members = {k: None if v is None else set(v) for k, v in sets.items()}
    wanted = None if any(m is None for m in members.values()) else sorted(set().union(*members.values()))
    ignore = store.ignore_index
    void = -1 if ignore is None else ignore
    metrics = {k: {m: _metric(store, cfg, boundary_width=cfg.boundary_width) for m in methods} for k in sets}
    split = {k: {m: (_metric(store, cfg, classwise=False), _metric(store, cfg, classwise=False)) for m in methods}
             for k in sets}
    per_image = {k: {m: _image_states(store, cfg) for m in methods} for k in sets}
    needs_images = any(_needs(c, "needs_images") for c in calibrators.values())
    total = len(wanted) if wanted is not None else len(store)
    with torch.inference_mode(), progress_bar(total, "evaluate calibrators", cfg.progress) as bar:
        for batch in store_source(store, cfg, dataset=dataset, images=needs_images, names=wanted)():
            logits, target = batch["logits"], batch["target"]
            if target is None:
                raise ValueError(f"store '{store.path}' has unlabelled images; calibration metrics need labels")
            pred = logits.argmax(1)
            valid = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
            # the two pixel subsets are expressed as targets whose other pixels are void
            sub_ignore = void if ignore is not None else None
            correct_t = torch.where(valid & (pred == target), target, void)
            wrong_t = torch.where(valid & (pred != target), target, void)
            outs = {m: logits if c is None else _apply(c, logits, dataset, batch["names"], batch.get("images"))
                    for m, c in methods.items()}
            for k, member in members.items():
                rows = _rows(batch["names"], member)
                if rows is not None and rows.numel() == 0:
                    continue
                pick = (lambda x: x) if rows is None else (lambda x, r=rows: x[r])
                for m in methods:
                    metrics[k][m].update(pick(outs[m]), pick(target))
                    if sub_ignore is not None:
                        split[k][m][0].update(pick(outs[m]), pick(correct_t))
                        split[k][m][1].update(pick(outs[m]), pick(wrong_t))
                    if per_image[k][m] is not None:
                        per_image[k][m].update(pick(outs[m]), pick(target))
            bar.update(len(batch["names"]))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    comparisons: dict[str, dict[str, Any]] = {}
    for k in sets:
        results[k] = {}
        for m in methods:
            res = calibration_summary(metrics[k][m])
            res["per_class_ece"] = res.pop("cw_ece_per_class", None)
            if ignore is not None:
                res["ece_correct"] = to_jsonable(split[k][m][0].compute()["ece"])
                res["ece_wrong"] = to_jsonable(split[k][m][1].compute()["ece"])
            results[k][m] = {key: v for key, v in res.items() if v is not None}
        comparisons[k] = _bootstrap_set(per_image[k], cfg)
    return results, comparisons


def _bootstrap_set(states: dict[str, Any], cfg: BenchmarkConfig) -> dict[str, Any]:
    base = states.get("uncalibrated")
    if base is None:
        return {}
    from segcal.metrics import paired_bootstrap

    out = {}
    for m, st in states.items():
        if m == "uncalibrated" or st is None:
            continue
        out[f"{m} vs uncalibrated"] = to_jsonable(paired_bootstrap(st, base, metric="ece",
                                                                   n_resamples=cfg.bootstrap_resamples,
                                                                   seed=cfg.seed))
    return out


# ---------------------------------------------------------------------------------------------------------- detection
def make_detectors(names: Sequence[str], model_name: str, model_has_features: bool, ignore_index: int | None,
                   cfg: BenchmarkConfig, skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Unfitted (or shipped, fitted) detectors by name; those the model cannot serve are skipped with a reason."""
    from segcal.detectors import DETECTORS

    out: dict[str, Any] = {}
    for name in names:
        det = None
        if cfg.pretrained_detectors:
            det = DETECTORS.resolve(name).pretrained(model_name)
        if det is None:
            det = build_method(DETECTORS, name, ignore_index, cfg.method_kwargs.get(name))
        if _needs(det, "needs_features") and not model_has_features:
            _skip(skipped, f"detector {name}", f"model {model_name!r} exposes no decoder features")
            continue
        out[name] = det
    return out


def fit_detectors(detectors: dict[str, Any], store: LogitsStore, dataset: Any, cfg: BenchmarkConfig,
                  images: Sequence[str] | None = None) -> dict[str, float]:
    """Fit the detectors that learn (``requires_fit`` and not already fitted) on the fit split's store
    (``images``: only these of its images)."""
    times = {}
    for name, det in detectors.items():
        if not _needs(det, "requires_fit") or det.is_fitted():
            continue
        source = store_source(store, cfg, dataset=dataset, images=_needs(det, "needs_images"),
                              features=_needs(det, "needs_features"), names=images)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        det.fit(source)
        times[name] = time.perf_counter() - start
        _stage(f"fitted detector {name} in {times[name]:.1f} s")
    return times


def _score(det: Any, logits: Tensor, features: Tensor | None, images: Tensor | None) -> Tensor:
    kwargs: dict[str, Any] = {}
    if _needs(det, "needs_features"):
        kwargs["features"] = features
    if _needs(det, "needs_images"):
        kwargs["images"] = images
    return det.score(logits, **kwargs)


def detection_summary(metric: DetectionMetrics) -> dict[str, Any]:
    """compute() + thinned ROC / PR curves of a detection metric, JSON-friendly."""
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


def _valid(target: Tensor, ignore_index: int | None) -> Tensor:
    return target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)


def evaluate_idm_on_sets(store: LogitsStore, dataset: Any, detectors: dict[str, Any], cfg: BenchmarkConfig,
                         sets: dict[str, Sequence[str] | None]) -> dict[str, dict[str, dict[str, Any]]]:
    """Misprediction detection (positive = ``argmax ≠ label`` on valid pixels), per image and pooled, for several
    image sets in one pass (each detector scores each batch once)."""
    members = {k: None if v is None else set(v) for k, v in sets.items()}
    wanted = None if any(m is None for m in members.values()) else sorted(set().union(*members.values()))
    metrics = {k: {d: DetectionMetrics(per_image=True) for d in detectors} for k in sets}
    images = any(_needs(d, "needs_images") for d in detectors.values())
    features = any(_needs(d, "needs_features") for d in detectors.values())
    total = len(wanted) if wanted is not None else len(store)
    with torch.inference_mode(), progress_bar(total, "evaluate detectors", cfg.progress) as bar:
        for batch in store_source(store, cfg, dataset=dataset, images=images, features=features, names=wanted)():
            logits, target = batch["logits"], batch["target"]
            valid = _valid(target, store.ignore_index)
            positive = (logits.argmax(1) != target) & valid
            scores = {d: _score(det, logits, batch.get("features"), batch.get("images"))
                      for d, det in detectors.items()}
            for k, member in members.items():
                rows = _rows(batch["names"], member)
                if rows is not None and rows.numel() == 0:
                    continue
                for d in detectors:
                    if rows is None:
                        metrics[k][d].update(scores[d], positive, valid)
                    else:
                        metrics[k][d].update(scores[d][rows], positive[rows], valid[rows])
            bar.update(len(batch["names"]))
    return {k: {d: detection_summary(m) for d, m in per.items()} for k, per in metrics.items()}


def _model_batches(model: Any, dataset: Any, cfg: BenchmarkConfig, desc: str, features: bool
                   ) -> Iterator[tuple[list[dict], Tensor, Tensor | None]]:
    """Run the model on a dataset on the fly (for protocols whose inputs are not cached)."""
    with torch.inference_mode(), progress_bar(len(dataset), desc, cfg.progress) as bar:
        for start in range(0, len(dataset), cfg.batch_size):
            samples = [dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))]
            images = np.stack([s["image"] for s in samples])
            if features:
                logits, feats = model.predict_batch(images, features=True)
                feats = feats.float()
            else:
                logits, feats = model.predict_batch(images), None
            bar.update(len(samples))
            yield samples, logits.float(), feats


def _batch_images(samples: Sequence[dict]) -> Tensor:
    return torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 255.0


def evaluate_anomalies(model: Any, test_set: Any, detectors: dict[str, Any], cfg: BenchmarkConfig
                       ) -> dict[str, dict[str, Any]]:
    """Pasted-anomaly OOD protocol: positive = pasted object pixels, negatives = valid in-distribution pixels.

    Objects are placed on the classes the dataset declares as drivable ground (``ground_classes``; anywhere below
    the horizon when it declares none). Besides AUROC / AP / FPR95 (pooled), each detector gets the open-set mIoU of
    FlowEneDet's protocol: pixels whose score reaches the F1-optimal threshold become an extra "unknown" class.
    """
    from segcal.data.anomalies import PastedAnomalyDataset
    from segcal.metrics.open_set import f1_optimal_threshold, open_set_miou

    ignore = getattr(test_set, "ignore_index", None)
    ground = getattr(test_set, "ground_classes", None)
    dataset = PastedAnomalyDataset(Subset.evenly_spaced(test_set, cfg.n_shift_images), seed=cfg.seed,
                                   ground_labels=tuple(ground) if ground else None)
    metrics = {d: DetectionMetrics(per_image=False) for d in detectors}
    kept: dict[str, list[Tensor]] = {d: [] for d in detectors}
    preds, targets, oods = [], [], []
    features = any(_needs(d, "needs_features") for d in detectors.values())
    for samples, logits, feats in _model_batches(model, dataset, cfg, "pasted anomalies", features):
        ood = torch.from_numpy(np.stack([s["ood_mask"] for s in samples]))
        target = torch.from_numpy(np.stack([s["target"] for s in samples]))
        valid = ood | _valid(target, ignore)
        preds.append(logits.argmax(1))
        targets.append(target)
        oods.append(ood)
        images = _batch_images(samples)
        for d, det in detectors.items():
            score = _score(det, logits, feats, images)
            metrics[d].update(score, ood, valid)
            kept[d].append(score.float())
    pred, target, ood = torch.cat(preds), torch.cat(targets), torch.cat(oods)
    valid = ood | _valid(target, ignore)
    out = {}
    for d, m in metrics.items():
        out[d] = detection_summary(m)
        score = torch.cat(kept[d])
        threshold = f1_optimal_threshold(score[valid], ood[valid])
        miou = open_set_miou(pred, torch.where(valid, target, -1), ood, score >= threshold, model.num_classes,
                             ignore_index=-1)
        out[d].update({k: to_jsonable(v) for k, v in miou.items()})
    return out


def evaluate_corruptions(model: Any, test_set: Any, detectors: dict[str, Any], calibrators: dict[str, Any],
                         cfg: BenchmarkConfig) -> dict[str, dict[str, dict[str, float]]]:
    """ECE (uncalibrated and per calibrator) and IDM AUROC per detector, per corruption and severity."""
    from segcal.data.corruptions import CorruptedDataset

    base = Subset.evenly_spaced(test_set, cfg.n_shift_images)
    ignore = getattr(test_set, "ignore_index", None)
    clean = _shift_point(model, base, ignore, detectors, calibrators, cfg, "clean")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for corruption in cfg.corruptions:
        out[corruption] = {"0": clean}
        for severity in cfg.severities:
            data = CorruptedDataset(base, corruption, severity, seed=cfg.seed)
            out[corruption][str(severity)] = _shift_point(model, data, ignore, detectors, calibrators, cfg,
                                                          f"{corruption}-{severity}")
    return out


def _shift_point(model: Any, dataset: Any, ignore: int | None, detectors: dict[str, Any],
                 calibrators: dict[str, Any], cfg: BenchmarkConfig, desc: str) -> dict[str, float]:
    cal_metrics = {m: CalibrationMetrics(model.num_classes, n_bins=cfg.n_bins, ignore_index=ignore, classwise=False)
                   for m in ("uncalibrated", *calibrators)}
    det_metrics = {d: DetectionMetrics(per_image=False) for d in detectors}
    features = any(_needs(d, "needs_features") for d in detectors.values())
    for samples, logits, feats in _model_batches(model, dataset, cfg, desc, features):
        target = torch.from_numpy(np.stack([s["target"] for s in samples]))
        valid = _valid(target, ignore)
        positive = (logits.argmax(1) != target) & valid
        images = _batch_images(samples)
        for m, metric in cal_metrics.items():
            metric.update(logits if m == "uncalibrated" else _apply(calibrators[m], logits, None, [], images),
                          target)
        for d, det in detectors.items():
            det_metrics[d].update(_score(det, logits, feats, images), positive, valid)
    point: dict[str, float] = {}
    for m, metric in cal_metrics.items():
        values = metric.compute()
        point[f"ECE {m}"] = to_jsonable(values["ece"])
        if m == "uncalibrated":
            point["mIoU"] = to_jsonable(values["miou"])
    for d, metric in det_metrics.items():
        point[f"IDM AUROC {d}"] = to_jsonable(metric.compute()["auroc"])
    return point


# ------------------------------------------------------------------------------------------------------- examples
def _colormap(values: np.ndarray, cmap: str = "magma") -> np.ndarray:
    import matplotlib

    return _to_uint8(matplotlib.colormaps[cmap](np.clip(values, 0, 1))[..., :3])


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 0…255 (truncating, as the panels always were)."""
    return (unit * np.iinfo(np.uint8).max).astype(np.uint8)


def _rank_normalise(score: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(score, [1, 99])
    return (score - lo) / max(hi - lo, 1e-12)


def class_palette(num_classes: int, dataset: Any = None) -> np.ndarray:
    """``(C, 3)`` uint8 colours: the dataset's own palette when it declares one, else the report's default one."""
    palette = getattr(dataset, "palette", None)
    if palette is not None and len(palette) >= num_classes:
        return np.asarray(palette, dtype=np.uint8)[:num_classes]
    from segcal.report import class_palette as default_palette

    return np.asarray(default_palette(num_classes), dtype=np.uint8).reshape(num_classes, 3)


def _colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    out = np.zeros((*labels.shape, 3), np.uint8)
    known = (labels >= 0) & (labels < len(palette))
    out[known] = palette[labels[known]]
    return out


def write_examples(store: LogitsStore, dataset: Any, detectors: dict[str, Any], out: Path, n: int,
                   palette: np.ndarray) -> list[dict[str, Any]]:
    """PNG panels for a few evaluation images: image, ground truth, prediction, confidence, errors, detector scores."""
    from PIL import Image

    if n <= 0:
        return []
    folder = out / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    picks = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    examples = []
    ignore = store.ignore_index
    for i in picks:
        sample = dataset[int(i)]
        name = sample["name"]
        entry = store.get(name)
        logits = entry.logits.float()[None]
        feats = entry.features.float()[None] if getattr(entry, "features", None) is not None else None
        conf, pred = logits.softmax(1)[0].max(0)
        target = sample.get("target")
        panels = {"image": sample["image"], "prediction": _colorize(pred.numpy(), palette),
                  "confidence (max softmax)": _colormap(conf.numpy(), "viridis")}
        if target is not None:
            valid = target != ignore if ignore is not None else np.ones(target.shape, bool)
            panels["ground truth"] = _colorize(np.where(valid, target, -1), palette)
            error = (pred.numpy() != target) & valid
            panels["errors (white)"] = np.repeat(_to_uint8(error.astype(np.float64))[..., None], 3, axis=2)
        images = _batch_images([sample])
        with torch.inference_mode():
            for d, det in detectors.items():
                score = _score(det, logits, feats, images)[0].numpy()
                panels[f"score: {d}"] = _colormap(_rank_normalise(score))
        rel = {}
        for title, img in panels.items():
            safe = "".join(ch if ch.isalnum() else "_" for ch in title)
            path = folder / f"{_slug(str(name))}_{safe}.png"
            h, w = img.shape[:2]
            Image.fromarray(img).resize((240, max(1, round(240 * h / w))), Image.NEAREST).save(path)
            rel[title] = str(path.relative_to(out))
        examples.append({"name": str(name), "panels": rel})
    return examples


# --------------------------------------------------------------------------------------------------- orchestration
def _skip(skipped: list[dict[str, str]], stage: str, reason: str) -> None:
    skipped.append({"stage": stage, "reason": reason})
    log.warning("segcal: skipped %s: %s", stage, reason)


def _markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"# segcal results — {meta['model']} on {meta['dataset']}", ""]
    cols = ("ece", "mce", "ace", "cw_ece", "nll", "brier", "oe", "boundary_ece", "interior_ece", "miou",
            "ece_correct", "ece_wrong")
    for eval_set, methods in results.get("calibration", {}).items():
        lines += _md_table(f"Calibration — {eval_set}", "method", cols, methods)
    dcols = ("auroc", "ap", "fpr95", "auroc_per_image", "ap_per_image", "fpr95_per_image", "open_set_miou")
    for protocol, dets in results.get("detection", {}).items():
        lines += _md_table(f"Detection — {protocol}", "detector", dcols, dets)
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
    for item in results.get("skipped", []):
        lines.append(f"- skipped {item['stage']}: {item['reason']}")
    return "\n".join(lines)


def _md_table(title: str, row_label: str, cols: Sequence[str], rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"## {title}", "", f"| {row_label} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_md_num(r.get(c)) for c in cols) + " |" for name, r in rows.items()]
    return [*lines, ""]


def _md_num(v: Any) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _write_json(path: Path, obj: Any) -> None:
    from segcal._io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def eval_sets(split: str, store: LogitsStore) -> dict[str, list[str] | None]:
    """``{split: None (all images), "split <subset>": names}`` for the named subsets the store declares."""
    sets: dict[str, list[str] | None] = {split: None}
    present = set(store.names)
    for sub, names in (getattr(store, "subsets", None) or {}).items():
        kept = [n for n in names if n in present]
        if kept and len(kept) < len(present):
            sets[f"{split} {sub}"] = kept
    return sets


def _calibration_stage(run: _Run, cfg: BenchmarkConfig, names: Sequence[str], label: str,
                       timings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    fit_store = run.stores[cfg.fit_split]
    _stage(f"{label}: fitting calibrators {list(names)} on {cfg.fit_split} ({len(fit_store)} images)")
    calibrators, timings[f"{label} calibrator_fit_s"] = fit_calibrators(names, fit_store,
                                                                        run.datasets[cfg.fit_split], cfg)
    calibration: dict[str, Any] = {}
    bootstrap: dict[str, Any] = {}
    for split in cfg.eval_splits:
        store = run.stores[split]
        _stage(f"{label}: calibration metrics on {split} ({len(store)} images) and its subsets")
        res, boot = evaluate_calibrators_on_sets(store, run.datasets[split], calibrators, cfg,
                                                 eval_sets(split, store))
        prefix = "" if label == "main" else f"shift: {run.spec} → "
        calibration.update({prefix + k: v for k, v in res.items()})
        bootstrap.update({prefix + k: v for k, v in boot.items() if v})
    return calibrators, calibration, bootstrap


def _load_run(cfg: BenchmarkConfig, spec: str, features: bool, splits: Sequence[str]) -> _Run:
    _stage(f"model {spec}; logits on {list(splits)} (cached under {cfg.cache})")
    model = load_model(cfg, spec)
    run = _Run(model=model, spec=spec)
    for split in splits:
        run.datasets[split] = make_dataset(cfg, split, int(model.num_classes))
        run.stores[split] = cached_store(model, spec, run.datasets[split], split, cfg, features=features)
    return run


def _class_names(store: LogitsStore) -> list[str]:
    names = store.class_names
    return list(names) if names else [f"class {k}" for k in range(store.num_classes)]


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the whole protocol; write ``results.json`` (first), ``results.md``, ``timings.json``, examples and
    ``index.html``. Stages that cannot run here (a missing optional dependency, a model without features) are
    skipped with a one-line reason, recorded under ``skipped``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    skipped: list[dict[str, str]] = []
    timings: dict[str, Any] = {}
    spec = resolve_model_spec(cfg)
    cal_names = list(cfg.calibrators) if cfg.calibrators is not None else list(all_calibrators())
    det_names = list(cfg.detectors) if cfg.detectors is not None else list(all_detectors())
    splits = list(dict.fromkeys([cfg.fit_split, *cfg.eval_splits]))

    probe_model = load_model(cfg, spec)
    model_name = str(getattr(probe_model, "name", spec))
    detectors = make_detectors(det_names, model_name, _model_has_features(probe_model), cfg.ignore_index, cfg,
                               skipped)
    features = any(_needs(d, "needs_features") for d in detectors.values())
    run = _load_run(cfg, spec, features, splits)
    fit_store = run.stores[cfg.fit_split]
    first_eval = cfg.eval_splits[0]
    eval_set = run.datasets[first_eval]

    calibrators, calibration, bootstrap = _calibration_stage(run, cfg, cal_names, "main", timings)
    for split in cfg.eval_splits:
        calibration[split].setdefault("uncalibrated", {})
        for m in calibrators:
            calibration[split][m]["fit_images"] = len(fit_store)

    for shift_spec in _shift_models(cfg, eval_set, skipped):
        shift_run = _load_run(cfg, shift_spec, False, splits)
        if shift_run.model.num_classes != run.model.num_classes:
            _skip(skipped, f"shift model {shift_spec}", f"predicts {shift_run.model.num_classes} classes, the data "
                                                         f"has {run.model.num_classes}")
            continue
        names = [c for c in (cfg.shift_calibrators or cal_names)]
        _, shift_cal, shift_boot = _calibration_stage(shift_run, cfg, names, "shift", timings)
        calibration.update(shift_cal)
        bootstrap.update(shift_boot)

    if cfg.checkpoints is not None:
        calibration["train-time losses (each + TS fit on the fit split)"] = evaluate_checkpoints(cfg)

    _stage(f"fitting detectors {list(detectors)} on {cfg.fit_split}")
    timings["detector_fit_s"] = fit_detectors(detectors, fit_store, run.datasets[cfg.fit_split], cfg)
    detection: dict[str, Any] = {}
    for split in cfg.eval_splits:
        sets = {f"IDM: {k} (positive = mispredicted pixel)": v
                for k, v in eval_sets(split, run.stores[split]).items()}
        detection.update(evaluate_idm_on_sets(run.stores[split], run.datasets[split], detectors, cfg, sets))
    if cfg.anomalies:
        if _has_module("skimage"):
            _stage("pasted-anomaly OOD protocol")
            detection[f"OOD: pasted anomalies on {first_eval}"] = evaluate_anomalies(run.model, eval_set,
                                                                                     detectors, cfg)
        else:
            _skip(skipped, "pasted-anomaly OOD protocol", "needs scikit-image (pip install scikit-image)")
    shift: dict[str, Any] = {}
    if cfg.corruptions:
        _stage(f"corruptions {list(cfg.corruptions)} at severities {list(cfg.severities)} on {first_eval}")
        shift = evaluate_corruptions(run.model, eval_set, detectors, calibrators, cfg)

    conformal = _conformal_stage(run, cfg)
    class_names = _class_names(fit_store)
    palette = class_palette(len(class_names), eval_set)
    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "meta": {"model": spec, "model_name": model_name, "dataset": _dataset_label(cfg, eval_set),
                 "fit_split": cfg.fit_split, "eval_splits": list(cfg.eval_splits),
                 "calibration fit": f"{cfg.fit_split} ({len(fit_store)} images)",
                 "evaluation": ", ".join(f"{s} ({len(run.stores[s])} images)" for s in cfg.eval_splits),
                 "num_classes": len(class_names), "ignore_index": fit_store.ignore_index, "n_bins": cfg.n_bins,
                 "seed": cfg.seed, "shift images": cfg.n_shift_images, "segcal_version": _version(),
                 "palette": palette.tolist()},
        "class_names": class_names,
        "config": _config_json(cfg, cal_names, det_names, spec),
        "calibration": calibration,
        "bootstrap": bootstrap,
        "detection": detection,
        "shift": shift,
        "conformal": conformal,
        "examples": [],
        "skipped": skipped,
    }
    _write_json(out / "results.json", results)
    _write_json(out / "timings.json", to_jsonable(timings))
    (out / "results.md").write_text(_markdown(results))
    _finish_outputs(results, run.stores[first_eval], eval_set, detectors, out, cfg, palette)
    _stage(f"wrote {out / 'results.json'} and {out / 'index.html'}")
    return results


def _conformal_stage(run: _Run, cfg: BenchmarkConfig) -> dict[str, Any]:
    """Each configured risk controller fitted on the fit split and judged on every evaluation split (and subsets)."""
    if not cfg.conformal:
        return {}
    from segcal.conformal import evaluate, get_controller

    fit_store = run.stores[cfg.fit_split]
    out = {}
    for label, spec in cfg.conformal.items():
        params = {k: v for k, v in spec.items() if k != "method"}
        params.setdefault("ignore_index", fit_store.ignore_index)
        _stage(f"conformal {label}: fit on {cfg.fit_split}, judged on {list(cfg.eval_splits)}")
        controller = get_controller(str(spec.get("method", label)), **params)
        out[label] = to_jsonable(evaluate(controller, fit_store, {s: run.stores[s] for s in cfg.eval_splits},
                                          class_names=_class_names(fit_store)))
    return out


def _finish_outputs(results: dict[str, Any], store: LogitsStore, dataset: Any, detectors: dict[str, Any], out: Path,
                    cfg: BenchmarkConfig, palette: np.ndarray) -> None:
    """Example panels and the HTML report, after ``results.json`` is safely on disk (plotting needs matplotlib)."""
    if not _has_module("matplotlib"):
        _skip(results["skipped"], "example panels and HTML report", "needs matplotlib (pip install matplotlib)")
        _write_json(out / "results.json", results)
        return
    results["examples"] = write_examples(store, dataset, detectors, out, cfg.n_examples, palette)
    _write_json(out / "results.json", results)
    from segcal.report import render_report

    render_report(out)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _shift_models(cfg: BenchmarkConfig, dataset: Any, skipped: list[dict[str, str]]) -> list[str]:
    if cfg.shift_models is not None:
        return [s for s in cfg.shift_models if s]
    declared = list(getattr(dataset, "shift_models", None) or [])
    usable = []
    for spec in declared:
        try:
            load_model(cfg, spec)
        except (FileNotFoundError, ValueError) as err:
            _skip(skipped, f"shift model {spec}", str(err))
            continue
        usable.append(spec)
    return usable


def _dataset_label(cfg: BenchmarkConfig, dataset: Any) -> str:
    name = getattr(dataset, "dataset_name", None) or getattr(getattr(dataset, "dataset", None), "dataset_name",
                                                             None)
    return str(name or cfg.data)


def _config_json(cfg: BenchmarkConfig, cal_names: list[str], det_names: list[str], spec: str) -> dict[str, Any]:
    raw = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
           if k not in ("out", "cache", "progress", "device")}
    raw.update(calibrators=cal_names, detectors=det_names, model=spec)
    return to_jsonable(raw)


def evaluate_checkpoints(cfg: BenchmarkConfig) -> dict[str, dict[str, Any]]:
    """Every ``<checkpoints>/<run>/last.pt`` (from ``segcal train``): metrics as trained, and after TS fitted on the
    fit split."""
    rows: dict[str, dict[str, Any]] = {}
    runs = sorted(p.parent for p in Path(cfg.checkpoints).glob("*/last.pt"))
    if not runs:
        raise FileNotFoundError(f"no <run>/last.pt checkpoints under {cfg.checkpoints}")
    split = cfg.eval_splits[0]
    for path in runs:
        run = _load_run(cfg, str(path / "last.pt"), False, [cfg.fit_split, split])
        cals, _ = fit_calibrators(["ts"], run.stores[cfg.fit_split], run.datasets[cfg.fit_split], cfg)
        res, _ = evaluate_calibrators_on_sets(run.stores[split], run.datasets[split], cals, cfg, {split: None})
        rows[path.name] = res[split]["uncalibrated"]
        rows[f"{path.name} + TS"] = res[split]["ts"]
    return rows


def _version() -> str:
    from segcal import __version__

    return __version__


def real_data_available() -> bool:
    """True when the data root (:func:`segcal.data.data_root`) holds CamVid and the ESPNet weights."""
    from segcal.data import data_root

    root = data_root()
    return (root / "camvid" / "val").is_dir() and (root / "espnet_pretrained").is_dir()


#: classes of the synthetic demo model (ESPNet's decoder needs at least 5)
SYNTHETIC_CLASSES = 8


def synthetic_espnet() -> Any:
    """The synthetic dataset's default model: an ESPNet trained from scratch for a minute on the synthetic train
    split, cached under ``$SEGCAL_CACHE`` (default ``cache``)/models. Spec: ``segcal.engine.protocol:synthetic_espnet``.
    """
    import os

    from segcal import models
    from segcal.data import load_dataset
    from segcal.engine.training import Trainer

    run = Path(os.environ.get("SEGCAL_CACHE", "cache")) / "models" / "synthetic-espnet"
    if not (run / "last.pt").is_file():
        train = load_dataset("synthetic", "train", num_classes=SYNTHETIC_CLASSES)
        torch.manual_seed(0)
        net = models.build_espnet("camvid", num_classes=train.num_classes, name="synthetic-espnet")
        Trainer(net, None, train, None, out_dir=run, epochs=15, batch_size=8, lr=5e-3, seed=0).fit(resume=True)
    return models.load(run / "last.pt")


def demo_config(out: Path, n_images: int = 16, synthetic: bool | None = None) -> BenchmarkConfig:
    """The README's first command: the protocol on a subset with the quick methods (minutes, not hours).

    Without real data (or with ``synthetic=True``) it runs on SYNTHETIC blobs with the synthetic dataset's default
    model (an ESPNet trained from scratch for a minute) — every number is then about that toy task.
    """
    if synthetic is None:
        synthetic = not real_data_available()
    quick = dict(calibrators=QUICK_CALIBRATORS, detectors=QUICK_DETECTORS, corruptions=QUICK_CORRUPTIONS,
                 severities=(1, 3, 5), method_kwargs=QUICK_KWARGS, n_examples=2, n_shift_images=8,
                 bootstrap_resamples=500, conformal={"coverage": {"method": "coverage", "alpha": 0.1,
                                                                  "epsilon": 0.1}})
    if synthetic:
        return BenchmarkConfig(out=out, data="synthetic", shift_models=(), n_images=None, anomalies=False, **quick)
    return BenchmarkConfig(out=out, data="camvid", n_images=n_images, pretrained_detectors=True,
                           shift_calibrators=("ts",), **quick)


__all__ = ["RESULTS_SCHEMA", "BenchmarkConfig", "all_calibrators", "all_detectors", "build_method", "cached_store",
           "demo_config", "eval_sets", "evaluate_anomalies", "evaluate_calibrators_on_sets", "evaluate_corruptions",
           "evaluate_idm_on_sets", "fit_calibrators", "fit_detectors", "load_model", "make_dataset", "make_detectors",
           "real_data_available", "run_benchmark", "store_source"]
