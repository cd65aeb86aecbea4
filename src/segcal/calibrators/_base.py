"""Shared machinery of the post-hoc calibrators: the estimator base class, fit-data sources and solvers.

Fit data. Every calibrator's ``fit`` accepts

* tensors: ``fit(logits (N,C,H,W), target (N,H,W), images=None)`` — processed in chunks of whole images so no
  float32 copy of the whole tensor is made;
* an object with a ``batches()`` method (``segcal.data.LogitsStore``) — called once per pass;
* a zero-argument callable returning a fresh iterator of batches — called once per pass;
* a re-iterable (list / tuple of batches) — iterated once per pass;
* a one-shot iterator (generator) — accepted only by single-pass methods (histogram binning, isotonic); multi-pass
  methods raise a ``ValueError`` asking for one of the re-iterable forms.

A batch is a tuple ``(logits, target)`` / ``(logits, target, images)`` or a dict with keys ``"logits"``, ``"target"``
and optionally ``"images"`` (or ``"image"``); other keys (``"names"``) are ignored.

Distributed fitting. When ``torch.distributed`` is initialised, every sufficient statistic, loss and gradient that a
solver sums over pixels goes through :meth:`Calibrator._all_reduce` (a SUM all-reduce), so each rank fitting on its own
shard ends with the same parameters as a single process fitting on the union of the shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from segcal._checks import check_dense_scores, check_images, check_logits_target
from segcal._estimator import FORMAT, Estimator, NotFittedError, Registry, clone  # noqa: F401 (re-exported)

_LEGACY_FORMAT = "segcal.calibrator"

#: Every calibrator class that declares a ``name``, by name (filled by the classes themselves).
CALIBRATORS = Registry("calibrator", "segcal.calibrators")

#: Pixels per chunk when a solver walks over pixels (bounds the float64 autograd memory of LBFGS fits).
CHUNK_PIXELS = 1 << 18


class ConvergenceWarning(UserWarning):
    """A solver stopped at its iteration limit before its tolerance was met (as sklearn's ConvergenceWarning)."""


@dataclass
class Batch:
    logits: Tensor
    target: Tensor
    images: Tensor | None = None


def _unpack(item: object) -> tuple[object, object, object]:
    if isinstance(item, Batch):
        return item.logits, item.target, item.images
    if isinstance(item, dict):
        if "logits" not in item or "target" not in item:
            raise ValueError(f"a batch dict needs keys 'logits' and 'target', got {sorted(item)}")
        return item["logits"], item["target"], item.get("images", item.get("image"))
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise TypeError("each batch must be a tuple (logits, target[, images]) or a dict with 'logits' and 'target', "
                    f"got {type(item).__name__}")


class BatchSource:
    """Re-iterable, validated view of fit data (see the module docstring for the accepted forms).

    Args:
        data: logits tensor or a source of batches.
        target: labels when ``data`` is a tensor, else None.
        images: optional images when ``data`` is a tensor.
        ignore_index: label excluded from fitting.
        chunk_pixels: tensors are split into chunks of whole images of about this many pixels.
    """

    def __init__(self, data: object, target: object = None, images: object = None, *, ignore_index: int | None,
                 chunk_pixels: int = 1 << 21) -> None:
        self.ignore_index = ignore_index
        self.num_classes: int | None = None
        self._one_shot = False
        self._used = False
        if isinstance(data, Tensor):
            if target is None:
                raise ValueError("`target` is required when `logits` is a tensor")
            logits, target = check_logits_target(data, target, ignore_index)
            if images is not None:
                images = check_images(images, logits.shape)
            if logits.shape[0] == 0:
                raise ValueError("`logits` is empty (N=0)")
            n, _, h, w = logits.shape
            step = max(1, chunk_pixels // max(1, h * w))
            self._checked = True

            def factory() -> Iterator[object]:
                for i in range(0, n, step):
                    yield (logits[i:i + step], target[i:i + step],
                           None if images is None else images[i:i + step])

            self._factory: Callable[[], Iterator[object]] = factory
            self.num_classes = logits.shape[1]
            return
        self._checked = False
        if target is not None or images is not None:
            raise ValueError("`target` / `images` must be inside the batches when fitting from an iterable of batches")
        batches = getattr(data, "batches", None)
        if callable(batches):
            self._factory = batches
        elif isinstance(data, Iterator):
            self._one_shot = True
            it = data
            self._factory = lambda: it
        elif callable(data):
            self._factory = data  # type: ignore[assignment]
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            self._factory = lambda: iter(data)  # type: ignore[arg-type]
        else:
            raise TypeError("`logits` must be a tensor, a LogitsStore, an iterable of batches or a callable returning "
                            f"an iterator of batches, got {type(data).__name__}")

    @property
    def multi_pass(self) -> bool:
        return not self._one_shot

    def __iter__(self) -> Iterator[Batch]:
        if self._one_shot and self._used:
            raise ValueError("this calibrator needs several passes over the fit data but got a one-shot iterator; pass "
                             "a list of batches, a LogitsStore or a zero-argument callable returning a fresh iterator")
        self._used = True
        seen = False
        for item in self._factory():
            logits, target, images = _unpack(item)
            if not self._checked:
                logits, target = check_logits_target(logits, target, self.ignore_index, self.num_classes)
                if images is not None:
                    images = check_images(images, logits.shape)
                if self.num_classes is None:
                    self.num_classes = logits.shape[1]
            seen = True
            yield Batch(logits, target, images)  # type: ignore[arg-type]
        if not seen:
            raise ValueError("the fit data is empty: no batches")


def valid_pixels(source: Iterable[Batch], ignore_index: int | None, *, dtype: torch.dtype = torch.float32,
                 chunk: int = CHUNK_PIXELS) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(z (P, C), y (P,))`` chunks of the valid pixels of every batch."""
    for b in source:
        mask = b.target != ignore_index if ignore_index is not None else torch.ones_like(b.target, dtype=torch.bool)
        if not mask.any():
            continue
        z = b.logits.permute(0, 2, 3, 1)[mask].to(dtype)
        y = b.target[mask].long()
        for i in range(0, y.numel(), chunk):
            yield z[i:i + chunk], y[i:i + chunk]


def subsample_pixels(source: Iterable[Batch], ignore_index: int | None, max_pixels: int | None,
                     generator: torch.Generator, *, parts: tuple[float, ...] | None = None,
                     image_parts: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded uniform sample (without replacement) of at most ``max_pixels`` valid pixels, in one pass.

    Every pixel — valid or not — gets a uniform random key from ``generator`` and the ``max_pixels`` largest keys among
    valid pixels are kept, so the sample depends on the seed and the batch shapes only, never on logit values.
    With ``parts=(f0, f1, ...)`` each *image* is also assigned to part k with probability f_k (for image-level splits);
    the part of every image, in stream order, is appended to ``image_parts`` when a list is given.

    Returns:
        ``z (P, C)`` float32, ``y (P,)`` int64 and ``part (P,)`` int64 (zeros without ``parts``).
    """
    zs: list[Tensor] = []
    ys: list[Tensor] = []
    ks: list[Tensor] = []
    ps: list[Tensor] = []
    thr = -1.0
    cum = torch.tensor(parts, dtype=torch.float64).cumsum(0) if parts is not None else None
    for b in source:
        n, _, h, w = b.logits.shape
        # Drawn image by image, so the sample does not depend on how images are grouped into batches.
        keys = torch.empty((n, h, w))
        img_part = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            keys[i] = torch.rand((h, w), generator=generator)
            if cum is not None:
                u = torch.rand(1, generator=generator, dtype=torch.float64)
                img_part[i] = torch.searchsorted(cum, u * cum[-1], right=True).clamp_max(len(cum) - 1)[0]
        if image_parts is not None:
            image_parts.extend(img_part.tolist())
        mask = keys > thr
        if ignore_index is not None:
            mask &= b.target != ignore_index
        if not mask.any():
            continue
        zs.append(b.logits.permute(0, 2, 3, 1)[mask].float())
        ys.append(b.target[mask].long())
        ks.append(keys[mask])
        ps.append(img_part[:, None, None].expand(n, h, w)[mask])
        if max_pixels is not None and sum(k.numel() for k in ks) > max_pixels:
            k = torch.cat(ks)
            top = torch.topk(k, max_pixels, sorted=False).indices.sort().values
            zs, ys, ks, ps = [torch.cat(zs)[top]], [torch.cat(ys)[top]], [k[top]], [torch.cat(ps)[top]]
            thr = float(ks[0].min())
    if not ys:
        raise ValueError("the fit data has no valid pixels (every label is ignore_index)")
    return torch.cat(zs), torch.cat(ys), torch.cat(ps)


def warm_sample(source: Iterable[Batch], ignore_index: int | None, size: int, generator: torch.Generator
                ) -> tuple[Tensor, Tensor]:
    """Cheap seeded sample of roughly ``size`` valid pixels (with replacement), for warm starts only.

    Positions are drawn at a rate that halves whenever the sample outgrows ``2 * size`` (adaptive Bernoulli sampling),
    so a pass costs O(sample), not O(pixels). Returns ``z (C, P)`` float32 and ``y (P,)``.
    """
    zs: list[Tensor] = []
    ys: list[Tensor] = []
    rate = None
    for b in source:
        n, c, h, w = b.logits.shape
        npix = n * h * w
        if rate is None:
            rate = min(1.0, 2.0 * size / npix)
        k = max(1, math.ceil(npix * rate))
        pos = torch.randint(0, npix, (k,), generator=generator)
        y = b.target.reshape(-1)[pos].long()
        valid = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
        pos, y = pos[valid], y[valid]
        img, pix = pos // (h * w), pos % (h * w)
        zs.append(b.logits.reshape(n, c, h * w)[img, :, pix].T.float())
        ys.append(y)
        total = sum(t.numel() for t in ys)
        if total > 2 * size:
            z_all, y_all = torch.cat(zs, 1), torch.cat(ys)
            keep = torch.randperm(total, generator=generator)[: total // 2].sort().values
            zs, ys, rate = [z_all[:, keep]], [y_all[keep]], rate / 2
    y_all = torch.cat(ys)
    if y_all.numel() == 0:
        raise ValueError("the fit data has no valid pixels (every label is ignore_index)")
    return torch.cat(zs, 1).contiguous(), y_all


def column_chunks(z: Tensor, y: Tensor, chunk: int = 1 << 14) -> Callable[[], Iterator[tuple[Tensor, Tensor, None]]]:
    """In-memory ``z (C, P)``, ``y (P,)`` as a re-iterable of column chunks (all valid)."""
    def it() -> Iterator[tuple[Tensor, Tensor, None]]:
        for i in range(0, y.numel(), chunk):
            yield z[:, i:i + chunk], y[i:i + chunk], None
    return it


def in_memory_chunks(z: Tensor, y: Tensor, chunk: int = CHUNK_PIXELS) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    def it() -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, y.numel(), chunk):
            yield z[i:i + chunk], y[i:i + chunk]
    return it


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor) -> Tensor:
    """In-place SUM all-reduce when torch.distributed is initialised (no-op otherwise)."""
    if _dist_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    if _dist_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def dense_columns(source: Iterable[Batch], ignore_index: int | None, chunk: int = 1 << 14
                  ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(z (C, P) float32, y (P,) int64, valid (P,) bool)`` column chunks of every image, without copies.

    Class-major chunks of ~16k pixels keep the per-pixel reductions over C vectorised and the temporaries in cache —
    several times faster than a ``(P, C)`` layout on CPU.
    """
    for b in source:
        n, c = b.logits.shape[:2]
        zf = b.logits.reshape(n, c, -1)
        yf = b.target.reshape(n, -1)
        for i in range(n):
            for j in range(0, zf.shape[2], chunk):
                y = yf[i, j:j + chunk].long()
                valid = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
                yield zf[i, :, j:j + chunk].float(), torch.where(valid, y, 0), valid


def _temperature_stats(z: Tensor, y: Tensor, valid: Tensor | None, beta: float, curvature: bool = True) -> Tensor:
    """Sums of f, f', f'' (0 unless ``curvature``) and the count, for f(β) = logsumexp(β z) − β z_y over valid columns
    of ``z (C, P)``."""
    s = z * beta
    m = s.amax(0)
    e = torch.exp(s - m)
    zsum = e.sum(0)
    ez = (e * z).sum(0) / zsum
    zy = z.gather(0, y[None]).squeeze(0)
    f = m + zsum.log() - beta * zy
    g = ez - zy
    var = None
    if curvature:
        d = z - ez
        var = (e * d * d).sum(0) / zsum
    if valid is not None:
        f, g = torch.where(valid, f, 0.0), torch.where(valid, g, 0.0)
        var = torch.where(valid, var, 0.0) if var is not None else None
        count = valid.sum()
    else:
        count = torch.tensor(y.numel(), device=f.device)
    h = var.double().sum() if var is not None else torch.zeros((), dtype=torch.float64, device=f.device)
    return torch.stack([f.double().sum(), g.double().sum(), h, count.double()])


def temperature_objective(columns: Callable[[], Iterable[tuple[Tensor, Tensor, Tensor | None]]], *,
                          curvature: bool = True) -> Callable[[float], Tensor]:
    """``beta -> [Σf, Σf', Σf'', count]`` over every ``(z (C,P), y, valid)`` chunk of ``columns()``."""
    def stats(beta: float) -> Tensor:
        out = torch.zeros(4, dtype=torch.float64)
        for z, y, valid in columns():
            out += _temperature_stats(z, y, valid, beta, curvature).cpu()
        return out
    return stats


def fit_inverse_temperature(stats_fn: Callable[[float], Tensor], *, beta0: float = 1.0,
                            bounds: tuple[float, float] = (0.02, 50.0), tol: float = 1e-3, max_iter: int = 50,
                            reduce: Callable[[Tensor], Tensor] = all_reduce_sum,
                            curvature: float | None = None) -> tuple[float, float]:
    """Minimise the mean NLL of ``softmax(β z)`` over β = 1/T by safeguarded Newton, one pass per iteration.

    The NLL is convex in β (its second derivative is the mean predictive variance of z), so Newton with a bracket is
    globally convergent, and quadratically: after a Newton step of relative size δ the remaining error is O(δ²), so
    the iteration stops after a step smaller than ``tol`` (5e-3 → ~1e-5 relative error). β is bounded to
    ``[1/T_max, 1/T_min]``: on separable data (every pixel correct) the optimum is β → ∞ and the solver stops at the
    bound instead of exploding.

    Args:
        stats_fn: ``beta -> tensor [Σf, Σf', Σf'', count]`` (one pass over the data).
        curvature: if given, a fixed f'' (e.g. from a warm-start sample) replaces the per-pass one, so a pass need not
            compute the predictive variance (~40% cheaper); near the optimum the step error is then
            O(step × relative curvature error).

    Returns:
        ``(beta, mean_nll)`` (the NLL at the last evaluated β).
    """
    t_min, t_max = bounds
    b_lo, b_hi = 1.0 / t_max, 1.0 / t_min
    lo, hi = b_lo, b_hi
    beta = min(max(beta0, b_lo), b_hi)
    nll = math.nan
    for _ in range(max_iter):
        stats = reduce(stats_fn(beta))
        if stats[3] == 0:
            raise ValueError("the fit data has no valid pixels (every label is ignore_index)")
        nll, g, h = (stats[:3] / stats[3]).tolist()
        if curvature is not None:
            h = curvature
        if g > 0:
            hi = beta
        else:
            lo = beta
        if (beta >= b_hi and g <= 0) or (beta <= b_lo and g >= 0) or g == 0:
            break
        new = beta - g / h if h > 1e-300 else (b_hi if g < 0 else b_lo)
        newton = lo < new < hi
        if not newton:
            # Outside the bracket: jump to an untouched bound (checks for a boundary optimum), else bisect.
            if new >= hi and hi == b_hi:
                new = b_hi
            elif new <= lo and lo == b_lo:
                new = b_lo
            else:
                new = math.sqrt(lo * hi)
        done = newton and abs(new - beta) <= tol * beta
        beta = new
        if done:
            break
    return beta, nll


def streaming_lbfgs(params: list[Tensor], loss_sum: Callable[[Tensor, Tensor], Tensor],
                    chunks: Callable[[], Iterable[tuple[Tensor, Tensor]]], *, max_iter: int = 100,
                    penalty: Callable[[], Tensor] | None = None,
                    reduce: Callable[[Tensor], Tensor] = all_reduce_sum, tol: float = 1e-9,
                    info: dict[str, Any] | None = None) -> float:
    """Full-batch L-BFGS on the mean of ``loss_sum`` over all pixels, one pass over the data per evaluation.

    Gradients are accumulated chunk by chunk (never the whole data set in memory) and SUM-all-reduced across ranks;
    ``penalty()`` (not divided by the pixel count) is added once per evaluation.

    Stops when the largest gradient entry of the mean objective is ≤ ``tol``, when the objective or the step changes
    by less than 1e-12 (absolute) between iterations, or after ``max_iter`` iterations
    (``2 · max_iter`` evaluations). When ``info`` is given it receives ``n_iter``, ``n_eval``, ``grad_max`` (at the
    returned point) and ``converged`` (False only when the iteration/evaluation limit stopped the solver while the
    gradient was still above ``tol``).
    """
    max_eval = 2 * max_iter
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=max_eval, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        stats = torch.zeros(2, dtype=torch.float64)
        for z, y in chunks():
            loss = loss_sum(z, y)
            loss.backward()
            stats[0] += float(loss.detach())
            stats[1] += y.numel()
        flat = torch.cat([stats] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                                    for p in params])
        reduce(flat)
        if flat[1] == 0:
            raise ValueError("the fit data has no valid pixels (every label is ignore_index)")
        count = flat[1]
        off = 2
        for p in params:
            k = p.numel()
            p.grad.copy_((flat[off:off + k] / count).reshape(p.shape))
            off += k
        total = flat[0] / count
        if penalty is not None:
            pen = penalty()
            pen.backward()
            total = total + pen.detach().double()
        return total.to(params[0].dtype)

    with torch.enable_grad():
        opt.step(closure)
        state = opt.state[opt._params[0]]
        # L-BFGS returns the loss at the start point; one more pass gives the objective (and gradient) at the solution.
        final = float(closure())
    grad_max = max(float(p.grad.abs().max()) for p in params if p.grad is not None and p.grad.numel())
    n_iter, n_eval = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    if info is not None:
        info.update(n_iter=n_iter, n_eval=n_eval, grad_max=grad_max,
                    converged=grad_max <= tol or (n_iter < max_iter and n_eval < max_eval))
    return final


class Calibrator(Estimator):
    """Base class: hyperparameters in ``__init__``, ``fit`` → self, ``transform`` → calibrated logits.

    The shared contract (``get_params``, :func:`~segcal._estimator.clone`, ``save``/``load``, ``name``,
    ``needs_images``, ``pretrained``) comes from :class:`~segcal._estimator.Estimator`; declaring a class-level
    ``name`` registers a subclass in :data:`CALIBRATORS`. Subclasses implement ``_fit(source)`` and
    ``_transform(z, images)`` and list their learned attributes in ``_learned`` (saved by :meth:`save`, together with
    ``num_classes_``). ``preserves_argmax`` states whether ``transform`` can change the prediction.
    """

    _registry = CALIBRATORS
    ignore_index: int | None
    preserves_argmax: ClassVar[bool] = True

    # -- fit / transform ---------------------------------------------------------------------------------------
    def fit(self, logits: object, target: Tensor | None = None, *, images: Tensor | None = None) -> Calibrator:
        """Fit on valid pixels of ``(logits, target)`` tensors or of a source of batches (see module docstring).

        Returns:
            self.
        """
        source = BatchSource(logits, target, images, ignore_index=self.ignore_index)
        for name in (*self._learned, "num_classes_"):
            self.__dict__.pop(name, None)
        self._fit(source)
        self.num_classes_ = int(source.num_classes)  # type: ignore[arg-type]
        return self

    def transform(self, logits: Tensor, images: Tensor | None = None) -> Tensor:
        """Calibrated logits, same shape; dtype is at least float32 (float16/bfloat16 input is upcast).

        ``images`` is used only by calibrators that need them (``needs_images``) and ignored otherwise.
        """
        self._check_fitted()
        logits = check_dense_scores(logits)
        if logits.shape[1] != self.num_classes_:
            raise ValueError(f"`logits` has C={logits.shape[1]} classes but {type(self).__name__} was fitted with "
                             f"C={self.num_classes_}")
        if images is not None:
            images = check_images(images, logits.shape)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.no_grad():
            return self._transform(logits.to(dtype), images).to(dtype)

    def predict_proba(self, logits: Tensor, images: Tensor | None = None) -> Tensor:
        """Calibrated class probabilities ``softmax(transform(logits))``, shape (N, C, H, W)."""
        return torch.softmax(self.transform(logits, images), dim=1)

    def _fit(self, source: BatchSource) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _all_reduce(self, t: Tensor) -> Tensor:
        """Distributed hook: SUM-reduce per-rank sufficient statistics / gradients (no-op without a process group)."""
        return all_reduce_sum(t)

    # -- fitted state ------------------------------------------------------------------------------------------
    def is_fitted(self) -> bool:
        return "num_classes_" in self.__dict__ and all(k in self.__dict__ for k in self._learned)

    def _get_state(self) -> dict[str, Any]:
        return {**super()._get_state(), "num_classes_": self.num_classes_}

    def _set_state(self, state: dict[str, Any]) -> None:
        c = state.get("num_classes_")
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"learned num_classes_ must be a positive int, got {c!r}")
        super()._set_state(state)
        self.num_classes_ = c

    @classmethod
    def _upgrade(cls, d: Any) -> Any:
        """Read files of the first calibrator format (``{"format": "segcal.calibrator", "class": ...}``)."""
        return _upgrade_legacy(d) if isinstance(d, dict) and d.get("format") == _LEGACY_FORMAT else d


def _upgrade_legacy(d: Any) -> Any:
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            if "__calibrator__" in v:
                return {"__estimator__": _upgrade_legacy(v["__calibrator__"])}
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        return v

    if not isinstance(d, dict) or d.get("format") != _LEGACY_FORMAT or not isinstance(d.get("class"), str):
        raise ValueError("not a saved segcal calibrator")
    return {"format": FORMAT, "version": 1, "kind": "calibrator", "name": CALIBRATORS.resolve(d["class"]).name,
            "class": d["class"], "params": conv(d.get("params")), "state": conv(d.get("state"))}


def pixel_chunks(source: BatchSource, ignore_index: int | None, max_pixels: int | None, seed: int,
                 prepare: Callable[[Tensor], Tensor] | None = None) -> Callable[[], Iterable[tuple[Tensor, Tensor]]]:
    """Valid ``(z (P, C), y)`` chunks: streamed from ``source`` on every pass, or a seeded sample kept in memory.

    ``prepare`` maps each chunk's ``z`` once (e.g. to float64 log-probabilities): for the in-memory sample once per
    fit instead of once per L-BFGS evaluation; for streamed chunks on every pass.
    """
    if max_pixels is not None:
        z, y, _ = subsample_pixels(source, ignore_index, max_pixels, torch.Generator().manual_seed(seed))
        return in_memory_chunks(prepare(z) if prepare is not None else z, y)
    if prepare is None:
        return lambda: valid_pixels(source, ignore_index)
    return lambda: ((prepare(z), y) for z, y in valid_pixels(source, ignore_index))


def fit_nll(params: list[Tensor], logits_fn: Callable[[Tensor], Tensor],
            chunks: Callable[[], Iterable[tuple[Tensor, Tensor]]], *, max_iter: int,
            penalty: Callable[[], Tensor] | None = None,
            reduce: Callable[[Tensor], Tensor] = all_reduce_sum, tol: float = 1e-9,
            info: dict[str, Any] | None = None) -> float:
    """Minimise mean NLL of ``softmax(logits_fn(z))`` (+ penalty) over float64 ``params`` by streaming L-BFGS
    (see :func:`streaming_lbfgs` for ``tol`` and ``info``)."""
    def loss_sum(z: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits_fn(z.double()), y, reduction="sum")
    return streaming_lbfgs(params, loss_sum, chunks, max_iter=max_iter, penalty=penalty, reduce=reduce, tol=tol,
                           info=info)


def lbfgs_report(cal: Calibrator, info: dict[str, Any]) -> None:
    """Store ``n_iter_`` / ``converged_`` from a :func:`streaming_lbfgs` ``info`` and warn when not converged."""
    import warnings

    cal.n_iter_ = int(info["n_iter"])
    cal.converged_ = bool(info["converged"])
    if not cal.converged_:
        limit = getattr(cal, "max_iter", info["n_iter"])
        warnings.warn(f"{type(cal).__name__} did not converge in max_iter={limit} L-BFGS iterations "
                      f"({info['n_eval']} evaluations; largest gradient entry {info['grad_max']:.2e} > tol); the "
                      "NLL may be above its optimum: raise max_iter", ConvergenceWarning, stacklevel=4)


def chunks_and_classes(source: BatchSource, ignore_index: int | None, max_pixels: int | None, seed: int,
                       prepare: Callable[[Tensor], Tensor] | None = None,
                       ) -> tuple[Callable[[], Iterable[tuple[Tensor, Tensor]]], int]:
    """:func:`pixel_chunks` plus the class count C (from the source, else from the first chunk)."""
    chunks = pixel_chunks(source, ignore_index, max_pixels, seed, prepare)
    return chunks, source.num_classes or next(iter(chunks()))[0].shape[1]
