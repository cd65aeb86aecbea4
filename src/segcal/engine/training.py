"""Fine-tuning loop: seeded data order and augmentation, poly schedule, atomic per-epoch checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcal.data.store import DEFAULT_IGNORE_INDEX

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "cross_entropy", "evaluate_model", "train"]

CHECKPOINT = "last.pt"
LOG = "log.jsonl"
#: TrainConfig fields that only change validation reporting: a resume may change them.
_REPORT_ONLY = ("val_subset", "val_batch_size", "n_bins")


class NonFiniteLossError(FloatingPointError, ValueError):
    """The training loss became NaN/inf (also a ValueError, so the CLI prints it as one line)."""


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int | None = 255) -> Tensor:
    """Mean cross-entropy over valid pixels; 0 (with a gradient path) when a batch has none, instead of NaN.

    Example:
        >>> cross_entropy(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 255)).item()
        0.0
    """
    if ignore_index is None:
        return F.cross_entropy(logits.float(), target)
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of :class:`Trainer` (all JSON-serialisable; stored in every checkpoint).

    Args:
        epochs: number of passes over the training set.
        batch_size: images per step (only equal-size images share a batch).
        optimizer: ``"adam"`` or ``"sgd"`` (momentum ``momentum``, Nesterov off).
        lr, weight_decay, momentum: optimiser settings.
        poly_power: learning rate ``lr · (1 − step/total)^poly_power``, stepped every batch.
        seed: seeds model-side randomness (dropout), data order, augmentation and the holdout split.
        crop_size: ``(h, w)`` random crop (padded with ignore where the image is smaller); None = full images.
        hflip: random horizontal flips (p = 0.5).
        holdout_fraction: part of the training set held out (seeded) to measure the pixel accuracy passed to
            ``loss.on_epoch_start`` — only when the loss has that hook; otherwise every image trains.
        max_steps_per_epoch: cut epochs short (benchmarks, smoke runs).
        subset: train on a seeded random subset of this many images.
        val_subset: validate on the first this-many validation images.
        val_batch_size: batch size of validation / holdout inference.
        grad_clip: clip the global gradient norm to this value (None = off).
        freeze_bn: keep BatchNorm layers in eval mode (running statistics frozen) -- for small batches or small
            crops, whose batch statistics differ from the pretrained ones.
        n_bins: validation ECE bins.
        ignore_index: the ignored label; ``"data"`` (default) takes ``train_data.ignore_index`` (None = every label
            is a class; 255 when the dataset declares nothing).
    """

    epochs: int = 10
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    seed: int = 0
    crop_size: tuple[int, int] | None = None
    hflip: bool = False
    holdout_fraction: float = 0.05
    max_steps_per_epoch: int | None = None
    subset: int | None = None
    val_subset: int | None = None
    val_batch_size: int = 4
    grad_clip: float | None = None
    freeze_bn: bool = False
    n_bins: int = 15
    ignore_index: int | str | None = "data"

    def validate(self) -> TrainConfig:
        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, got {v!r}")

        for n in ("epochs", "batch_size", "val_batch_size", "n_bins"):
            pos_int(n)
        for n in ("max_steps_per_epoch", "subset", "val_subset"):
            pos_int(n, allow_none=True)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.poly_power >= 0):
            raise ValueError(f"need lr > 0, weight_decay >= 0, poly_power >= 0; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, poly_power={self.poly_power}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"`holdout_fraction` must be in [0, 1), got {self.holdout_fraction}")
        ign = self.ignore_index
        if ign != "data" and ign is not None and (isinstance(ign, bool) or not isinstance(ign, int)):
            raise ValueError(f"`ignore_index` must be an int, None or 'data', got {ign!r}")
        if self.crop_size is not None:
            cs = tuple(self.crop_size)
            if len(cs) != 2 or any(not isinstance(c, int) or c < 1 for c in cs):
                raise ValueError(f"`crop_size` must be (h, w) positive ints or None, got {self.crop_size!r}")
            self.crop_size = (int(cs[0]), int(cs[1]))
        return self


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _augment(image: np.ndarray, target: np.ndarray, cfg: TrainConfig, g: torch.Generator,
             ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    if cfg.crop_size is not None:
        ch, cw = cfg.crop_size
        h, w = target.shape
        if h < ch or w < cw:
            if ignore_index is None:
                raise ValueError(f"crop_size {cfg.crop_size} is larger than a {h}x{w} image and the data has no "
                                 "ignore_index to pad the labels with")
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
            target = np.pad(target, ((0, ph), (0, pw)), constant_values=ignore_index)
            h, w = target.shape
        y = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        x = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        image, target = image[y:y + ch, x:x + cw], target[y:y + ch, x:x + cw]
    if cfg.hflip and bool(torch.rand((), generator=g) < 0.5):
        image, target = image[:, ::-1], target[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


def _load_sample(dataset: Any, i: int) -> dict:
    s = dataset[int(i)]
    if not isinstance(s, dict) or "image" not in s:
        raise TypeError(f"dataset item {i} must be a dict with 'image', 'target', 'name'")
    return s


def _eval_batches(dataset: Any, indices: Sequence[int], batch_size: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for i in indices:
        s = _load_sample(dataset, i)
        if group and (len(group) == batch_size or group[0]["image"].shape != s["image"].shape):
            yield group
            group = []
        group.append(s)
    if group:
        yield group


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Any, indices: Sequence[int] | None = None, batch_size: int = 4,
                   num_classes: int | None = None, n_bins: int = 15, ignore_index: int | None = 255
                   ) -> dict[str, float]:
    """Validation metrics of ``model`` on ``dataset`` (eval mode, no grad): miou, accuracy, ece, nll.

    Uses :class:`segcal.metrics.CalibrationMetrics` when available, else a local histogram implementation of the
    same definitions (equal-width bins, valid pixels pooled over the dataset).

    Example:
        See :func:`train` (its history's ``val_*`` entries come from this function).
    """
    num_classes = int(num_classes or model.num_classes)
    indices = range(len(dataset)) if indices is None else indices
    was = model.training
    model.eval()
    metric = None
    try:
        from segcal.metrics import CalibrationMetrics

        metric = CalibrationMetrics(num_classes, n_bins=n_bins, ignore_index=ignore_index)
    except ImportError:
        pass
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    bins = torch.zeros(3, n_bins, dtype=torch.float64)  # count, confidence sum, correct sum
    nll_sum = 0.0
    try:
        for group in _eval_batches(dataset, indices, batch_size):
            if any(s.get("target") is None for s in group):
                raise ValueError("validation/holdout images need labels ('target' is None)")
            logits = model(model.preprocess(np.stack([s["image"] for s in group]))).float()
            target = torch.as_tensor(np.stack([s["target"] for s in group])).long()
            if metric is not None:
                metric.update(logits, target)
                continue
            valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
            logp = logits.log_softmax(1).permute(0, 2, 3, 1)[valid]
            y = target[valid]
            c, pred = logp.exp().max(1)
            conf += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(
                num_classes, num_classes).double()
            b = (c * n_bins).ceil().clamp(1, n_bins).long() - 1
            bins[0] += torch.bincount(b, minlength=n_bins).double()
            bins[1] += torch.bincount(b, weights=c.double(), minlength=n_bins)
            bins[2] += torch.bincount(b, weights=(pred == y).double(), minlength=n_bins)
            nll_sum -= float(logp.gather(1, y[:, None]).sum())
    finally:
        model.train(was)
    if metric is not None:
        out = metric.compute()
        return {k: float(out[k]) for k in ("miou", "accuracy", "ece", "nll") if k in out}
    n = float(bins[0].sum())
    if n == 0:
        return {"miou": float("nan"), "accuracy": float("nan"), "ece": float("nan"), "nll": float("nan")}
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    ece = float((bins[1] - bins[2]).abs().sum() / n)
    return {"miou": float(iou.mean()), "accuracy": float(tp.sum() / n), "ece": ece, "nll": nll_sum / n}


class Trainer:
    """Fine-tune a segmenter with any dense loss, checkpointing every epoch so a killed run resumes exactly.

    Every random choice comes from ``config.seed``: model-side randomness from the global torch RNG (seeded at the
    start, saved in every checkpoint), the data order and augmentation of epoch ``e`` from a generator seeded with
    ``(seed, e)``. Resuming from the checkpoint of epoch ``e`` therefore gives bit-identical weights to a run that
    was never interrupted (on CPU).

    A resume refuses (one-line ``ValueError`` listing every difference) when the run's identity changed: any
    :class:`TrainConfig` field that affects training, the loss (class and hyperparameters), the starting model
    (class, name, class count, weight fingerprint) or the data (identity, length, image names). The ignored label
    comes from the training set (``train_data.ignore_index``) and the class count from the model.

    Files in ``out_dir``: ``last.pt`` (a segcal checkpoint, loadable with :func:`segcal.models.load`, plus optimizer,
    scheduler, RNG, loss state and history; written atomically) and ``log.jsonl`` (one JSON object per epoch:
    train loss, lr, mean step/data time, validation metrics, holdout accuracy).

    Args:
        model: a Segmenter (``preprocess``, ``forward``, ``num_classes``); trained in place.
        loss: callable ``loss(logits, target) -> scalar`` (None: cross-entropy ignoring ``ignore_index``); with
            ``needs_ids = True`` it is called with ``ids=[names]``; ``on_epoch_start(epoch, val_accuracy=...)`` is
            called every epoch with the held-out pixel accuracy; ``state_dict``/``load_state_dict`` are checkpointed.
        train_data: dataset of ``{"image", "target", "name"}`` samples with labels.
        val_data: optional labelled dataset for per-epoch validation (mIoU, accuracy, ECE, NLL).
        out_dir: where checkpoints and the log go (None: no files, no resume).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        progress: show tqdm bars.

    Example:
        >>> import tempfile
        >>> # trainer = Trainer(segmenter, None, CamVid(split="train"), CamVid(split="val"), out_dir="runs/ft")
        >>> # history = trainer.fit(resume=True)
        >>> TrainConfig(epochs=2).validate().epochs
        2
    """

    def __init__(self, model: nn.Module, loss: Callable[..., Tensor] | None, train_data: Any, val_data: Any = None,
                 out_dir: str | os.PathLike | None = None,
                 config: TrainConfig | None = None, progress: bool = True, **overrides: Any) -> None:
        if not isinstance(model, nn.Module) or not hasattr(model, "preprocess"):
            raise TypeError(f"`model` must be a segcal Segmenter (nn.Module with preprocess), got "
                            f"{type(model).__name__}")
        if len(train_data) == 0:
            raise ValueError("`train_data` is empty")
        cfg = dataclasses.replace(config or TrainConfig(), **overrides)
        if cfg.ignore_index == "data":
            cfg = dataclasses.replace(cfg, ignore_index=getattr(train_data, "ignore_index", DEFAULT_IGNORE_INDEX))
        self.config = cfg.validate()
        self.model = model
        self.train_data = train_data
        self.val_data = val_data
        ign = self.config.ignore_index
        if loss is not None and not callable(loss):
            raise TypeError(f"`loss` must be callable, got {type(loss).__name__}")
        loss_ign = getattr(loss, "ignore_index", ign)
        if loss_ign != ign:
            raise ValueError(f"the loss ignores label {loss_ign!r} but the training data's ignore_index is {ign!r}; "
                             f"build the loss with ignore_index={ign!r}")
        self.loss = loss if loss is not None else (lambda lg, t: cross_entropy(lg, t, ign))
        self._loss_spec = _describe_loss(loss)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.history: list[dict] = []
        self.epoch = 0
        self.global_step = 0
        self._split_indices()
        self._identity = self._run_identity()
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._poly)

    # ---------------------------------------------------------------- setup
    def _split_indices(self) -> None:
        cfg = self.config
        n = len(self.train_data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_hold = 0
        if hasattr(self.loss, "on_epoch_start") and cfg.holdout_fraction > 0 and n > 1:
            n_hold = min(n - 1, max(1, round(cfg.holdout_fraction * n)))
        self.holdout_indices = sorted(order[:n_hold])
        train = order[n_hold:]
        if cfg.subset is not None:
            train = train[: cfg.subset]
        self.train_indices = sorted(train)
        self.steps_per_epoch = math.ceil(len(self.train_indices) / cfg.batch_size)
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = max(1, self.steps_per_epoch * cfg.epochs)

    def _run_identity(self) -> dict[str, Any]:
        """What a resume must not change: training settings, loss, starting model, data (JSON-serialisable)."""
        from segcal.engine.inference import model_fingerprint

        cfg = {k: _norm(v) for k, v in dataclasses.asdict(self.config).items() if k not in _REPORT_ONLY}
        m = self.model
        model = {"class": type(m).__name__, "name": getattr(m, "name", None), "num_classes": getattr(m, "num_classes",
                 None), "arch": getattr(m, "arch", None), "weights": model_fingerprint(m)}
        return {"config": cfg, "loss": self._loss_spec, "model": model, "train_data": _describe_data(self.train_data),
                "val_data": _describe_data(self.val_data) if self.val_data is not None else None}

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _poly(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.total_steps) ** self.config.poly_power

    # ---------------------------------------------------------------- data
    def _epoch_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = [self.train_indices[i] for i in torch.randperm(len(self.train_indices), generator=g).tolist()]
        buckets: dict[tuple, list[tuple[np.ndarray, np.ndarray, str]]] = {}
        emitted = 0
        for i in perm:
            s = _load_sample(self.train_data, i)
            if s.get("target") is None:
                raise ValueError(f"training image '{s.get('name', i)}' has no labels")
            img, tgt = _augment(np.asarray(s["image"]), np.asarray(s["target"]), cfg, g, cfg.ignore_index)
            key = img.shape
            group = buckets.setdefault(key, [])
            group.append((img, tgt, str(s.get("name", i))))
            if len(group) == cfg.batch_size:
                yield self._collate(buckets.pop(key))
                emitted += 1
                if emitted == self.steps_per_epoch:
                    return
        for group in buckets.values():
            yield self._collate(group)
            emitted += 1
            if emitted == self.steps_per_epoch:
                return

    @staticmethod
    def _collate(group: list[tuple[np.ndarray, np.ndarray, str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return np.stack([g[0] for g in group]), np.stack([g[1] for g in group]), [g[2] for g in group]

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT if self.out_dir is not None else None

    def save_checkpoint(self) -> Path | None:
        """Write ``last.pt`` atomically (model, optimizer, scheduler, RNG, epoch, loss state, history)."""
        path = self._checkpoint_path()
        if path is None:
            return None
        extra = {
            "epoch": self.epoch, "step": self.global_step, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng_state": torch.get_rng_state(),
            "loss": self.loss.state_dict() if hasattr(self.loss, "state_dict") else None,
            "train_config": dataclasses.asdict(self.config), "run_identity": self._identity, "history": self.history,
            "metrics": self.history[-1] if self.history else {},
        }
        try:
            from segcal.models import Segmenter
            from segcal.models.checkpoint import save_checkpoint

            if isinstance(self.model, Segmenter):
                return save_checkpoint(path, self.model, **extra)
        except ImportError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"state_dict": self.model.state_dict(), **extra}, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore every piece of training state saved by :meth:`save_checkpoint`."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling raises many types; report one line
            raise ValueError(f"cannot read checkpoint '{path}' ({type(err).__name__}: "
                             f"{_first_line(err)}); delete it or pass resume=False (CLI --no-resume)") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer" not in ckpt:
            raise ValueError(f"'{path}' is not a training checkpoint of segcal's Trainer")
        saved = ckpt.get("run_identity")
        if saved is None:  # checkpoints written before run identities: compare the config only
            mine = {k: _norm(v) for k, v in dataclasses.asdict(self.config).items() if k not in _REPORT_ONLY}
            saved, mine = {"config": {k: _norm(v) for k, v in ckpt.get("train_config", {}).items() if k in mine}}, \
                {"config": mine}
        else:
            mine = self._identity
        diff = _differences(json.loads(json.dumps(saved)), json.loads(json.dumps(mine)))
        if diff:
            raise ValueError(f"checkpoint '{path}' was trained with different settings: {'; '.join(diff)}; resume "
                             "with the same settings, or pass resume=False (CLI --no-resume) to start over")
        try:
            self.model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise ValueError(f"checkpoint '{path}' holds weights of another model ({_first_line(err)}); resume with "
                             "the model it was trained from, or pass resume=False (CLI --no-resume)") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_state"])
        if ckpt.get("loss") is not None and hasattr(self.loss, "load_state_dict"):
            self.loss.load_state_dict(ckpt["loss"])
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))

    def _move_previous_run(self) -> None:
        assert self.out_dir is not None
        k = 1
        while (self.out_dir / f"previous-{k}").exists():
            k += 1
        dest = self.out_dir / f"previous-{k}"
        dest.mkdir()
        for name in (CHECKPOINT, LOG):
            if (self.out_dir / name).exists():
                os.replace(self.out_dir / name, dest / name)
        warnings.warn(f"starting over (resume=False): the previous run in '{self.out_dir}' was moved to '{dest}'",
                      stacklevel=3)

    def _write_log(self) -> None:
        if self.out_dir is None:
            return
        # rewritten from the checkpointed history, so the log never disagrees with what a resume restores
        _atomic_text(self.out_dir / LOG, "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))

    # ---------------------------------------------------------------- loop
    def _call_loss(self, logits: Tensor, target: Tensor, names: list[str]) -> Tensor:
        if getattr(self.loss, "needs_ids", False):
            return self.loss(logits, target, ids=names)
        return self.loss(logits, target)

    def fit(self, resume: bool = False) -> list[dict]:
        """Train for the configured epochs (continuing from ``out_dir/last.pt`` when ``resume``).

        Args:
            resume: continue a previous run from its last checkpoint (starts fresh when there is none); refused
                with a one-line ``ValueError`` when the settings, loss, model or data differ from the checkpoint's.
                With ``resume=False`` an existing run is started over: its ``last.pt`` and ``log.jsonl`` are
                moved (never deleted) to ``out_dir/previous-<k>/``, with a warning.

        Returns:
            The per-epoch history (also in ``log.jsonl``).
        """
        cfg = self.config
        ckpt = self._checkpoint_path()
        if ckpt is not None and ckpt.exists() and not resume:
            self._move_previous_run()
        if ckpt is not None and ckpt.exists():
            self.load_checkpoint(ckpt)
        else:
            torch.manual_seed(cfg.seed)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        is_module_loss = isinstance(self.loss, nn.Module)
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            record: dict[str, Any] = {"epoch": epoch + 1}
            if hasattr(self.loss, "on_epoch_start"):
                acc = None
                if self.holdout_indices:
                    acc = evaluate_model(self.model, self.train_data, self.holdout_indices, cfg.val_batch_size,
                                         n_bins=cfg.n_bins, ignore_index=cfg.ignore_index)["accuracy"]
                    record["holdout_accuracy"] = acc
                self.loss.on_epoch_start(epoch, val_accuracy=acc)
            self.model.train()
            if cfg.freeze_bn:
                for mod in self.model.modules():
                    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                        mod.eval()
            if is_module_loss:
                self.loss.train()
            losses, step_times, data_times = [], [], []
            bar = None
            if self.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                           disable=None)
            t_data = time.perf_counter()
            for images, targets, names in self._epoch_batches(epoch):
                t0 = time.perf_counter()
                data_times.append(t0 - t_data)
                x = self.model.preprocess(images)
                target = torch.from_numpy(targets).long().to(x.device)
                logits = self.model(x)
                loss = self._call_loss(logits, target, names)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {float(loss.detach())} at epoch {epoch + 1}, step "
                                             f"{len(losses) + 1} (global step {self.global_step + 1}, images "
                                             f"{names}); lower the learning rate or check the labels")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.global_step += 1
                losses.append(float(loss.detach()))
                t_data = time.perf_counter()
                step_times.append(t_data - t0)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if bar is not None:
                bar.close()
            if is_module_loss:
                self.loss.eval()
            record.update({"train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": len(losses),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "step_time_mean": float(np.mean(step_times)) if step_times else float("nan"),
                           "data_time_mean": float(np.mean(data_times)) if data_times else float("nan")})
            if self.val_data is not None:
                idx = range(min(len(self.val_data), cfg.val_subset or len(self.val_data)))
                val = evaluate_model(self.model, self.val_data, idx, cfg.val_batch_size, n_bins=cfg.n_bins,
                                     ignore_index=cfg.ignore_index)
                record.update({f"val_{k}": v for k, v in val.items()})
            self.history.append(record)
            self.epoch = epoch + 1
            self.save_checkpoint()
            self._write_log()
        self.model.eval()
        return self.history


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Tensor) and v.numel() <= 64:
        return v.tolist()
    return f"<{type(v).__name__}>"


def _describe_loss(loss: Any) -> dict[str, Any]:
    """Class and hyperparameters (public plain attributes) of a loss, for the resume check."""
    if loss is None:
        return {"class": "cross_entropy"}
    params = {k: _jsonable(v) for k, v in sorted(vars(loss).items())
              if not k.startswith("_") and k != "training" and not callable(v) and not isinstance(v, (dict, set))}
    name = type(loss).__qualname__ if isinstance(loss, nn.Module) or not hasattr(loss, "__qualname__") \
        else loss.__qualname__
    return {"class": name, **params}


def _describe_data(data: Any) -> dict[str, Any]:
    from segcal.engine.inference import dataset_id

    names = getattr(data, "names", None)
    digest = None
    if names is not None:
        digest = hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()[:16]
    return {"id": dataset_id(data), "len": len(data), "names": digest,
            "ignore_index": getattr(data, "ignore_index", None)}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every leaf that differs between two JSON-like trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if old != new:
        label = prefix.removeprefix("config.")
        return [f"{label} {old!r} -> now {new!r}"]
    return []


def train(model: nn.Module, train_data: Any, val_data: Any = None, loss: Callable[..., Tensor] | None = None,
          out_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
          **config: Any) -> list[dict]:
    """Fine-tune ``model`` on ``train_data``; a one-call wrapper around :class:`Trainer`.

    Args:
        model: a Segmenter, trained in place.
        train_data, val_data: datasets of ``{"image", "target", "name"}`` samples.
        loss: dense loss callable (default cross-entropy with ``ignore_index``).
        out_dir: checkpoint/log folder (``last.pt``, ``log.jsonl``).
        resume: continue from ``out_dir/last.pt``.
        progress: tqdm bars.
        **config: :class:`TrainConfig` fields (``epochs=``, ``lr=``, ``crop_size=``, ...).

    Returns:
        Per-epoch history: ``train_loss``, ``lr``, ``step_time_mean``, ``val_miou``, ``val_ece``, ...

    Example:
        >>> import numpy as np, torch
        >>> from torch import nn
        >>> class Seg(nn.Module):
        ...     num_classes = 2
        ...     def __init__(self):
        ...         super().__init__(); self.conv = nn.Conv2d(3, 2, 1)
        ...     def preprocess(self, im):
        ...         return torch.as_tensor(im).permute(0, 3, 1, 2).float() / 255
        ...     def forward(self, x):
        ...         return self.conv(x)
        >>> data = [{"image": np.full((4, 4, 3), 255 * (i % 2), np.uint8), "target": np.full((4, 4), i % 2),
        ...          "name": str(i)} for i in range(4)]
        >>> hist = train(Seg(), data, data, epochs=2, batch_size=2, lr=0.1, progress=False)
        >>> len(hist), hist[-1]["val_accuracy"]
        (2, 1.0)
    """
    return Trainer(model, loss, train_data, val_data, out_dir=out_dir, progress=progress,
                   **config).fit(resume=resume)
