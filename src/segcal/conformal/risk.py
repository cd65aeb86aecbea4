r"""Conformal risk control for any per-image loss that is monotone in the threshold (the shared machinery).

Conformal risk control (CRC). A threshold λ ∈ [0, 1] grows a prediction set per pixel,
:math:`S_λ(x)_{hw} = \{k : s_k(x)_{hw} \le λ\}`, where the score is LAC, :math:`s_k = 1 - p_k`, or APS,
:math:`s_k = \sum_{j \text{ ranked above } k} p_j` (the class mass ranked above k). A
per-image loss :math:`L_i(λ) \in [0, B]` that never increases with λ is controlled at level α by

.. math::
    \hat λ = \inf\Big\{ λ : \frac{n}{n+1} \hat R_n(λ) + \frac{B}{n+1} \le α \Big\},
    \qquad \hat R_n(λ) = \frac1n \sum_{i=1}^n L_i(λ),

which gives :math:`\mathbb E[L_{n+1}(\hat λ)] \le α` for a new image exchangeable with the n calibration images
(Angelopoulos et al., Theorem 1). The guarantee is marginal, over the draw of the calibration split *and* the test
image; it is per image, not per pixel; and it says nothing about images that are not exchangeable with the
calibration images (another sequence, weather, camera or model shift).

Computation. The infimum is taken over a grid: ``n_grid`` equally spaced λ on [0, 1]; with ``refine=True`` a second
pass evaluates ``n_grid`` points inside the bracket of the coarse answer, so λ̂ is the exact infimum over a fixed grid
of spacing ``1 / ((n_grid - 1) · n_grid)`` (the bracket only depends on the data through the monotone risk curve, so
this is the same as searching the whole fine grid). Restricting λ to a grid can only make λ̂ larger — more
conservative — never invalid. Per-image losses are summed as fixed-point integers (see ``_bounds``), so batches, the
order of images and ranks cannot change λ̂; with ``torch.distributed`` initialised each rank passes its own shard and
the sums are all-reduced.

References:
    A. N. Angelopoulos, S. Bates, A. Fisch, L. Lei, T. Schuster, "Conformal Risk Control", ICLR 2024,
    arXiv:2208.02814. L. Mossina, J. Dalmau, L. Andéol, "Conformal Semantic Image Segmentation: Post-hoc
    Quantification of Predictive Uncertainty", CVPR Workshops 2024, arXiv:2304.06052.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from segcal._checks import check_dense_scores
from segcal.calibrators import Calibrator, NotFittedError, clone
from segcal.conformal._bounds import (
    adjusted_risk,
    all_reduce_sum,
    check_monotone,
    crc_index,
    exceed_counts,
    from_fixed,
    make_grid,
    refine_grid,
    to_fixed,
)
from segcal.conformal._source import Source

SCORES = ("lac", "aps")
_FORMAT = "segcal.risk_control"


def _is_fitted(cal: object) -> bool:
    return not isinstance(cal, Calibrator) or hasattr(cal, "num_classes_")


def _in_calibrator_part(name: str, share: float) -> bool:
    """Seeded-by-name image assignment: sha1 of the name as a uniform number in [0, 1)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16) / float(1 << 48) < share


class _Part:
    """The images of a :class:`Source` on one side of the name-hash split (re-iterable; batches re-cut)."""

    def __init__(self, source: Source, share: float, *, calibrator_part: bool) -> None:
        self.source, self.share, self.calibrator_part = source, share, calibrator_part

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        seen = False
        for logits, target, names in self.source:
            keep = [i for i, n in enumerate(names) if _in_calibrator_part(n, self.share) == self.calibrator_part]
            if keep:
                seen = True
                idx = torch.tensor(keep)
                yield logits[idx], target[idx], [names[i] for i in keep]
        if not seen:
            side = "calibrator" if self.calibrator_part else "threshold"
            raise ValueError(f"no calibration image fell into the {side} part of `calibrator_split`="
                             f"{self.share}; use more images or another split")


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def class_scores(probs: Tensor, score: str = "lac") -> Tensor:
    """Non-conformity score of every class, ``(N, C, H, W)`` float64 in [0, 1]; class k is in the set iff s_k ≤ λ.

    ``"lac"``: ``1 - p_k``. ``"aps"``: the probability mass of the classes ranked strictly above k (APS without
    randomisation at its lower end, u = 0: the top class always scores 0, so a set is never empty; ties broken by the
    stable sort order). The inclusive variant (u = 1) gives the top class a score near 1 on confident pixels — empty
    sets below that λ and a step of the risk curve at λ ≈ 1 — which is why it is not used. At λ = 1 every class is in.
    """
    p = probs.double()
    if score == "lac":
        return (1.0 - p).clamp_(0.0, 1.0)
    if score == "aps":
        last = p.movedim(1, -1).contiguous()  # sorting along a contiguous last axis is several times faster
        sorted_p, order = torch.sort(last, dim=-1, descending=True, stable=True)
        cum = (sorted_p.cumsum(-1) - sorted_p).clamp_(0.0, 1.0)
        return torch.empty_like(last).scatter_(-1, order, cum).movedim(-1, 1)
    raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")


class RiskControl:
    r"""Conformal risk control of a user-given per-image loss, monotone (non-increasing) in λ.

    See the module docstring for the equation and the guarantee. The loss is called once per grid point and batch,
    ``loss(pred_set, target, valid) -> (N,)``, with ``pred_set`` the bool sets ``(N, C, H, W)`` at that λ, ``target``
    ``(N, H, W)`` and ``valid`` the non-void pixels ``(N, H, W)``; it must return one value in ``[0, bound]`` per image
    and never increase when the sets grow. Monotonicity (and the range) is **checked** on every calibration image on
    the grid; a loss that rises somewhere is refused with an explanation (a check on the data seen, so a necessary
    condition — the maths needs it for every image). ``n_grid`` calls per batch make a user loss slower than the
    vectorised :class:`CoverageRiskControl` / :class:`FNRControl`; lower ``n_grid`` if needed.

    Args:
        loss: callable ``(pred_set, target, valid) -> (N,)`` per-image losses.
        alpha: target risk level α ∈ (0, 1).
        bound: B, an upper bound of the loss (1 for fractions and indicators).
        score: ``"lac"`` or ``"aps"`` class scores.
        calibrator: a post-hoc calibrator (``segcal.calibrators``, logits-only) applied to the logits first, or
            None. A fitted one is used as is (fit it on data disjoint from the calibration split: scores that depend
            on the calibration images void the exchangeability argument). An unfitted one is cloned and fitted on a
            share ``calibrator_split`` of the calibration images; λ̂ is then calibrated on the other images only.
        calibrator_split: share of the calibration images that fit an unfitted ``calibrator``. Images are assigned
            by a hash of their name (index for tensors), so the split does not depend on order, batching or ranks.
        ignore_index: void label, excluded from losses and set sizes; None = no void label.
        n_grid: grid size.
        refine: second pass inside the coarse bracket (needs re-iterable data).
        batch_size: images per batch when reading tensors or a store.

    Attributes:
        threshold_ (float): λ̂ (alias ``lambda_hat_``). risk_bound_ (float): the upper bound used,
            ``(n R̂_n(λ̂) + B)/(n+1) ≤ α``. empirical_risk_ (float): ``R̂_n(λ̂)``. set_size_ (float): mean set size per
            valid pixel (classes; for masks, the fraction of pixels in the mask) on the calibration split at λ̂.
            n_calibration_ (int): n. grid_ (Tensor): coarse grid. risk_curve_ (Tensor): ``R̂_n`` on ``grid_``.
            set_size_curve_ (Tensor): mean set size on ``grid_``. feasible_ (bool): some λ met the bound.
            num_classes_ (int).

    References:
        Angelopoulos et al., "Conformal Risk Control", arXiv:2208.02814.

    Example:
        >>> def miss(pred_set, target, valid):   # fraction of valid pixels whose true class is not in the set
        ...     hit = pred_set.gather(1, target.clamp_max(pred_set.shape[1] - 1)[:, None])[:, 0]
        ...     return ((~hit) & valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
        >>> g = torch.Generator().manual_seed(0)
        >>> z, y = torch.randn(40, 3, 8, 8, generator=g) * 2, torch.randint(0, 3, (40, 8, 8), generator=g)
        >>> rc = RiskControl(miss, alpha=0.2, n_grid=51).fit(z, y)
        >>> rc.risk_bound_ <= 0.2, rc.predict(z).shape
        (True, torch.Size([40, 3, 8, 8]))
    """

    _learned = ("threshold_", "risk_bound_", "empirical_risk_", "set_size_", "n_calibration_", "grid_",
                "risk_curve_", "set_size_curve_", "feasible_", "num_classes_", "calibrator_")

    def __init__(self, loss: Callable[[Tensor, Tensor, Tensor], Tensor], *, alpha: float = 0.1, bound: float = 1.0,
                 score: str = "lac", calibrator: Calibrator | None = None, calibrator_split: float = 0.5,
                 ignore_index: int | None = 255, n_grid: int = 1001, refine: bool = True, batch_size: int = 4) -> None:
        self.loss = loss
        self.alpha = alpha
        self.bound = bound
        self.score = score
        self.calibrator = calibrator
        self.calibrator_split = calibrator_split
        self.ignore_index = ignore_index
        self.n_grid = n_grid
        self.refine = refine
        self.batch_size = batch_size

    # -- sklearn-style parameters ------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Hyperparameters, as passed to ``__init__``."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self"}

    def set_params(self, **params: Any) -> RiskControl:
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}; valid: {sorted(valid)}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def lambda_hat_(self) -> float:
        """Alias of ``threshold_`` (the paper's λ̂)."""
        self._check_fitted()
        return self.threshold_

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"`alpha` must be in (0, 1), got {self.alpha!r}")
        if not (isinstance(self.bound, (int, float)) and self.bound > 0):
            raise ValueError(f"`bound` must be a positive number, got {self.bound!r}")
        if self.score not in SCORES:
            raise ValueError(f"`score` must be one of {SCORES}, got {self.score!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {self.batch_size!r}")
        cal = self.calibrator
        if cal is not None:
            if not callable(getattr(cal, "transform", None)):
                raise TypeError(f"`calibrator` must be a fitted segcal calibrator (with transform), got "
                                f"{type(cal).__name__}")
            if not _is_fitted(cal):
                if not isinstance(cal, Calibrator):
                    raise TypeError(f"`calibrator`={type(cal).__name__} is not fitted and not a segcal Calibrator")
                if not (isinstance(self.calibrator_split, (int, float)) and 0.0 < self.calibrator_split < 1.0):
                    raise ValueError("`calibrator_split` must be in (0, 1) to fit an unfitted calibrator, got "
                                     f"{self.calibrator_split!r}")
            if getattr(cal, "needs_images", False):
                raise ValueError(f"`calibrator`={type(cal).__name__} needs images; the risk controllers see logits "
                                 "only — use a logits-only calibrator")
        make_grid(self.n_grid)

    def _check_fitted(self) -> None:
        if not hasattr(self, "num_classes_"):
            raise NotFittedError(f"this {type(self).__name__} instance is not fitted yet; call fit(logits, target) "
                                 "first")

    # -- scores and per-image curves ---------------------------------------------------------------------------
    def scores(self, logits: Tensor) -> Tensor:
        """Scores ``(N, C', H, W)`` float64 in [0, 1] from logits (through ``calibrator`` when given); a class / pixel
        is in the prediction iff its score ≤ λ. C' = C for sets, 1 for a single-class mask."""
        return self._select(self._class_scores(logits))

    def _class_scores(self, logits: Tensor) -> Tensor:
        z = logits
        cal = self._calibrator()
        if cal is not None:
            z = cal.transform(z)
        with torch.no_grad():
            return class_scores(torch.softmax(z.double(), dim=1), self.score)

    def _select(self, scores: Tensor) -> Tensor:
        """Hook: the score channels the prediction uses (all classes for sets)."""
        return scores

    def _score_key(self) -> tuple[object, ...]:
        """Controllers with equal keys share class scores in :func:`image_curves`."""
        return (self.score, id(self._calibrator()))

    def _calibrator(self) -> Calibrator | None:
        """The calibrator in use: the fitted copy ``calibrator_`` when fit() fitted one, else ``calibrator``."""
        return self.__dict__.get("calibrator_", self.calibrator)

    def _valid(self, target: Tensor) -> Tensor:
        if self.ignore_index is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target != self.ignore_index

    def _curves(self, scores: Tensor, target: Tensor, valid: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
        """Per image and grid point: losses ``(N, G)`` float64 and ``counted (N,)`` bool.

        ``counted`` marks the images that enter n (all of them, unless a subclass skips some).
        """
        n = scores.shape[0]
        tgt = torch.where(valid, target, 0)
        losses = torch.empty(n, grid.numel(), dtype=torch.float64)
        for g, lam in enumerate(grid.tolist()):
            out = self.loss(scores <= lam, tgt, valid)
            if not isinstance(out, Tensor) or out.shape != (n,):
                raise ValueError(f"`loss` must return a tensor of shape (N,) = ({n},), got "
                                 f"{getattr(out, 'shape', type(out).__name__)}")
            losses[:, g] = out.double()
        return losses, torch.ones(n, dtype=torch.bool)

    @staticmethod
    def _set_sizes(scores: Tensor, valid: Tensor, grid: Tensor) -> Tensor:
        """Per image and λ, the number of (valid pixel, class) pairs in the set, ``(N, G)`` int64."""
        c = scores.shape[1]
        mask = valid[:, None].expand_as(scores)
        total = valid.flatten(1).sum(1, dtype=torch.int64)[:, None] * c
        return total - exceed_counts(scores, mask, grid)

    def per_image_curves(self, data: object, target: Tensor | None = None, grid: Tensor | None = None
                         ) -> dict[str, Any]:
        """Per-image loss and set-size curves on a grid, in one pass; see :func:`image_curves`."""
        return image_curves([self], data, target, grid)[0]

    def _check_classes(self, c: int) -> None:
        """Hook: validate the class count of the data (FNR checks its class index)."""

    def _mask_class(self) -> int | None:
        """The class of a single-mask controller (its pixel coverage is that class's recall); None for sets."""
        return None

    # -- fitting ------------------------------------------------------------------------------------------------
    def _pass(self, source: Source, grid: Tensor) -> tuple[int, int, Tensor, Tensor]:
        """One pass: (n counted images, valid pixels, fixed-point loss sums (G,), set-size sums (G,)), all-reduced."""
        g = grid.numel()
        stats = torch.zeros(3 + 2 * g, dtype=torch.int64)  # n, valid pixels, violations, loss sums, set sizes
        error: str | None = None
        for logits, tgt, names in source:
            self._check_classes(logits.shape[1])
            valid = self._valid(tgt)
            scores = self.scores(logits)
            losses, counted = self._curves(scores, tgt, valid, grid)
            sizes = self._set_sizes(scores, valid, grid)
            if error is None:
                error = check_monotone(losses, grid, self.bound, names)
            stats[0] += int(counted.sum())
            stats[1] += int(valid.sum())
            stats[3:3 + g] += to_fixed(losses[counted], self.bound).sum(0)
            stats[3 + g:] += sizes.sum(0)
        stats[2] = int(error is not None)
        all_reduce_sum(stats)
        if stats[2] > 0:
            raise ValueError(error or "the loss is not monotone in the threshold on another rank's data (see that "
                             "rank's error)")
        if stats[0] == 0:
            raise ValueError("no calibration image counts towards the risk (every image was empty or skipped)")
        return int(stats[0]), int(stats[1]), stats[3:3 + g], stats[3 + g:]

    def fit(self, data: object, target: Tensor | None = None) -> RiskControl:
        """Find λ̂ on a calibration split.

        Args:
            data: ``logits (N, C, H, W)`` with ``target``; or a :class:`~segcal.data.LogitsStore`; or an iterable /
                zero-argument callable of batches ``(logits, target)`` / ``{"logits", "target"[, "names"]}``; a
                one-shot iterator works with ``refine=False``. Under ``torch.distributed`` give each rank its shard.
            target: labels ``(N, H, W)`` when ``data`` is a tensor.

        Returns:
            self.

        Raises:
            ValueError: bad shapes / labels / NaN logits, empty data, a loss that is not monotone in λ.
        """
        self._check_params()
        for name in (*self._learned, "_loss_sum"):
            self.__dict__.pop(name, None)
        self.__dict__.pop("calibrator_", None)
        source: Any = Source(data, target, ignore_index=self.ignore_index, batch_size=self.batch_size)
        if self.calibrator is not None and not _is_fitted(self.calibrator):
            fitted = clone(self.calibrator)
            part = _Part(source, self.calibrator_split, calibrator_part=True)
            try:
                fitted.fit(lambda: ((z, y) for z, y, _ in part))
            except ValueError as e:
                raise ValueError(f"fitting `calibrator` on its share of the calibration images failed: {e}") from e
            self.calibrator_ = fitted
            source = _Part(source, self.calibrator_split, calibrator_part=False)
        grid = make_grid(self.n_grid)
        n, pixels, loss_fp, sizes = self._pass(source, grid)
        loss_sum = from_fixed(loss_fp, self.bound)
        idx = crc_index(loss_sum, n, self.alpha, self.bound)
        self.grid_ = grid
        self._loss_sum = loss_sum  # exact decoded sums (risk_curve_ * n may round differently at a tie)
        self.risk_curve_ = loss_sum / n
        self.set_size_curve_ = sizes.double() / max(pixels, 1)
        self.n_calibration_ = n
        self.feasible_ = idx is not None
        if idx is None:
            warnings.warn(f"no threshold meets the CRC bound at alpha={self.alpha} with n={n} calibration images "
                          f"(the bound needs (sum of losses + B)/(n+1) <= alpha, so at least n >= B/alpha - 1 = "
                          f"{self.bound / self.alpha - 1:.0f} images, and a loss that reaches it); using λ = 1 "
                          "(the largest sets), which carries no guarantee", RuntimeWarning, stacklevel=2)
            idx = grid.numel() - 1
        lam_grid, lam_loss, lam_size = grid, loss_sum, sizes
        if self.refine and self.feasible_ and idx > 0:
            fine = refine_grid(grid, idx, self.n_grid)
            _, _, f_fp, f_sizes = self._pass(source, fine)
            f_sum = from_fixed(f_fp, self.bound)
            j = crc_index(f_sum, n, self.alpha, self.bound)
            j = fine.numel() - 1 if j is None else j  # the last fine point is the coarse point, which qualified
            lam_grid, lam_loss, lam_size, idx = fine, f_sum, f_sizes, j
        self.threshold_ = float(lam_grid[idx])
        self.empirical_risk_ = float(lam_loss[idx] / n)
        self.risk_bound_ = float(adjusted_risk(lam_loss[idx], n, self.bound))
        self.set_size_ = float(lam_size[idx].double() / max(pixels, 1))
        self.num_classes_ = int(source.num_classes)
        return self

    def threshold_for(self, alpha: float) -> float:
        """λ̂ on the coarse grid for another level α, from the stored calibration risk curve (no data pass)."""
        self._check_fitted()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
        idx = crc_index(self._loss_sum, self.n_calibration_, alpha, self.bound)
        return float(self.grid_[-1 if idx is None else idx])

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Save hyperparameters and learned values (``torch.save`` of plain types; loadable with weights_only).

        A fitted ``calibrator`` is saved with it. A user ``loss`` (a Python callable) cannot be saved safely:
        :class:`RiskControl` with a callable raises ``TypeError``.
        """
        params = {}
        for k, v in self.get_params().items():
            if isinstance(v, Calibrator):
                v = {"__calibrator__": v._to_dict(with_state=True)}
            elif callable(v):
                raise TypeError(f"{type(self).__name__}.save cannot store the callable `{k}`; save the threshold "
                                "(threshold_) yourself and rebuild the controller with the same loss")
            params[k] = v
        state = {k: ({"__calibrator__": v._to_dict(with_state=True)} if isinstance(v, Calibrator) else v)
                 for k in (*self._learned, "_loss_sum") if k in self.__dict__ for v in [self.__dict__[k]]}
        torch.save({"format": _FORMAT, "version": 1, "class": type(self).__name__, "params": params,
                    "state": state}, path)

    @classmethod
    def load(cls, path: str | Path) -> RiskControl:
        """Load a controller saved by :meth:`save` (any built-in controller when called on :class:`RiskControl`)."""
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved segcal risk controller")
        known = {c.__name__: c for c in _subclasses(RiskControl)}
        if d["class"] not in known:
            raise ValueError(f"unknown risk controller class {d['class']!r}; known: {sorted(known)}")
        target = known[d["class"]]
        if not issubclass(target, cls):
            raise ValueError(f"{path} holds a {d['class']}, not a {cls.__name__}")
        params = {k: Calibrator._from_dict(v["__calibrator__"]) if isinstance(v, dict) and "__calibrator__" in v
                  else v for k, v in d["params"].items()}
        obj = target(**params)
        for k, v in d["state"].items():
            if isinstance(v, dict) and "__calibrator__" in v:
                v = Calibrator._from_dict(v["__calibrator__"])
            setattr(obj, k, v)
        return obj

    # -- prediction ---------------------------------------------------------------------------------------------
    def _checked_scores(self, logits: Tensor) -> Tensor:
        self._check_fitted()
        logits = check_dense_scores(logits)
        if logits.shape[1] != self.num_classes_:
            raise ValueError(f"`logits` has C={logits.shape[1]} classes but {type(self).__name__} was fitted with "
                             f"C={self.num_classes_}")
        return self.scores(logits)

    def predict(self, logits: Tensor) -> Tensor:
        """Prediction sets at λ̂: bool ``(N, C, H, W)``, class k in the set of a pixel iff its score ≤ λ̂."""
        return self._checked_scores(logits) <= self.threshold_

    def set_size(self, logits: Tensor) -> Tensor:
        """Number of classes in every pixel's set at λ̂, int64 ``(N, H, W)``."""
        return self.predict(logits).sum(1)


def image_curves(controllers: Sequence[RiskControl], data: object, target: Tensor | None = None,
                 grid: Tensor | None = None) -> list[dict[str, Any]]:
    """Per-image loss and set-size curves of several controllers on a grid, in **one** pass over the data.

    Controllers with the same score (and calibrator) share the softmax and the scores; the costly part is then the
    set-size histogram, shared too. This is what re-split studies need: curves once, then any calibration subset's
    λ̂ from :func:`~segcal.conformal.threshold_from_curves` / :func:`~segcal.conformal.resplit_thresholds`.

    Args:
        controllers: risk controllers (unfitted is fine); all must share ``ignore_index`` and ``batch_size``.
        data, target: any accepted data form (see ``RiskControl.fit``).
        grid: sorted float64 thresholds; defaults to each controller's coarse grid ``make_grid(n_grid)``.

    Returns:
        One dict per controller: ``{"grid" (G,), "names" [N], "losses" (N, G) float64, "set_sizes" (N, G) int64
        (classes in the sets of the valid pixels; for a mask, pixels in it), "valid_pixels" (N,) int64, "counted" (N,)
        bool}``.
    """
    controllers = list(controllers)
    if not controllers or not all(isinstance(c, RiskControl) for c in controllers):
        raise TypeError("`controllers` must be a non-empty sequence of risk controllers")
    first = controllers[0]
    if any(c.ignore_index != first.ignore_index for c in controllers):
        raise ValueError("all controllers must share one ignore_index to be evaluated in one pass")
    for c in controllers:
        c._check_params()
    grids = [make_grid(c.n_grid) if grid is None else grid.double() for c in controllers]
    acc: list[dict[str, list[Any]]] = [{"losses": [], "set_sizes": [], "counted": []} for _ in controllers]
    names: list[str] = []
    valid_pixels: list[Tensor] = []
    for logits, tgt, bnames in Source(data, target, ignore_index=first.ignore_index, batch_size=first.batch_size):
        valid = first._valid(tgt)
        full: dict[tuple[object, ...], Tensor] = {}
        sizes: dict[tuple[object, ...], Tensor] = {}
        for c, g, a in zip(controllers, grids, acc, strict=True):
            c._check_classes(logits.shape[1])
            key = c._score_key()
            if key not in full:
                full[key] = c._class_scores(logits)
            scores = c._select(full[key])
            losses, counted = c._curves(scores, tgt, valid, g)
            err = check_monotone(losses, g, c.bound, bnames)
            if err is not None:
                raise ValueError(err)
            skey = (*key, c._mask_class(), g.numpy().tobytes())
            if skey not in sizes:
                sizes[skey] = c._set_sizes(scores, valid, g)
            a["losses"].append(losses)
            a["set_sizes"].append(sizes[skey])
            a["counted"].append(counted)
        names += bnames
        valid_pixels.append(valid.flatten(1).sum(1, dtype=torch.int64))
    vp = torch.cat(valid_pixels)
    return [{"grid": g, "names": list(names), "valid_pixels": vp, **{k: torch.cat(v) for k, v in a.items()}}
            for g, a in zip(grids, acc, strict=True)]
