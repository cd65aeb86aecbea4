"""Judge a risk controller on held-out data: empirical risk with its interval, set sizes, per class and per subset.

:func:`evaluate` is the entry point the CLI, the protocol and the report use; its result is plain JSON (the schema is
in its docstring and ``docs/conformal.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from segcal.conformal._bounds import FIXED_POINT_BITS, clopper_pearson, crc_index, from_fixed, mean_interval, to_fixed
from segcal.conformal._source import Source
from segcal.conformal.risk import RiskControl

DEFAULT_ALPHAS = tuple(round(0.01 * k, 2) for k in range(1, 31))


def threshold_from_curves(losses: Tensor, grid: Tensor, alpha: float, bound: float = 1.0,
                          counted: Tensor | None = None) -> float:
    """λ̂ from per-image loss curves ``(N, G)`` on ``grid`` (see ``RiskControl.per_image_curves``).

    Uses the same fixed-point sums and rule as ``fit(refine=False)``, so a re-split study that computes the curves
    once gets exactly the thresholds separate fits would give. Returns ``grid[-1]`` when no point meets the bound.
    """
    if counted is not None:
        losses = losses[counted]
    n = losses.shape[0]
    if n == 0:
        raise ValueError("no calibration image counts towards the risk")
    idx = crc_index(from_fixed(to_fixed(losses, bound).sum(0), bound), n, alpha, bound)
    return float(grid[-1 if idx is None else idx])


def resplit_thresholds(losses: Tensor, grid: Tensor, alpha: float, calibration: Tensor, bound: float = 1.0,
                       counted: Tensor | None = None) -> Tensor:
    """λ̂ of many calibration subsets at once: ``calibration (S, N)`` bool masks over the images of ``losses (N, G)``.

    Row s equals ``threshold_from_curves(losses[calibration[s]], grid, alpha, bound, counted[calibration[s]])`` bit
    for bit (the fixed-point sums are one exact int64 matrix product), for cheap re-split studies.
    """
    if calibration.ndim != 2 or calibration.shape[1] != losses.shape[0]:
        raise ValueError(f"`calibration` must be (S, N={losses.shape[0]}) bool masks, got {tuple(calibration.shape)}")
    sel = calibration.bool()
    if counted is not None:
        sel = sel & counted.bool()[None]
    n = sel.sum(1)
    if bool((n == 0).any()):
        raise ValueError("a calibration subset has no image that counts towards the risk")
    fixed = to_fixed(losses, bound)
    if int(n.max()) < 2 ** (53 - FIXED_POINT_BITS):
        # every partial sum is an integer below 2^53, so a float64 product is exact (and much faster than int64)
        sums = from_fixed((sel.double() @ fixed.double()).round().long(), bound)
    else:
        sums = from_fixed(sel.long() @ fixed, bound)
    ok = (sums + bound) / (n[:, None].double() + 1) <= alpha
    first = torch.where(ok.any(1), ok.long().argmax(1), torch.full_like(n, grid.numel() - 1))
    return grid[first]


def _is_binary(values: Tensor, bound: float) -> bool:
    return bool(((values == 0) | (values == bound)).all())


def _risk_summary(losses: Tensor, bound: float, alpha: float, confidence: float) -> dict[str, Any]:
    n = losses.numel()
    if n == 0:
        return {"n_images": 0, "risk": None, "risk_ci": [None, None], "interval": None}
    risk = float(losses.double().mean())
    if _is_binary(losses, bound):
        k = int((losses == bound).sum())
        lo, hi = clopper_pearson(k, n, confidence)
        lo, hi, method = lo * bound, hi * bound, "clopper-pearson"
    else:
        lo, hi = mean_interval(losses, confidence)
        method = "normal"
    return {"n_images": n, "risk": risk, "risk_ci": [lo, hi], "interval": method,
            "meets_alpha": risk <= alpha, "ci_excludes_alpha": lo > alpha}


def evaluate(controller: RiskControl, fit_source: object = None, eval_sources: Mapping[str, object] | None = None,
             *, subsets: Mapping[str, Sequence[str]] | None = None, class_names: Sequence[str] | None = None,
             alphas: Sequence[float] = DEFAULT_ALPHAS, confidence: float = 0.95, n_examples: int = 2,
             example_width: int = 160) -> dict[str, Any]:
    """Fit ``controller`` on ``fit_source`` (if given) and judge it on every source of ``eval_sources``.

    A source is a :class:`~segcal.data.LogitsStore`, a zero-argument callable / iterable of batches
    (``{"logits", "target"[, "names"]}`` or ``(logits, target)``), or a ``(logits, target)`` tuple of tensors.

    Args:
        controller: a risk controller (fitted already when ``fit_source`` is None).
        fit_source: calibration data, or None.
        eval_sources: name → held-out data.
        subsets: image-subset name → image names (e.g. video sequences), reported inside every split that holds
            some of them. When None, a store's ``subsets`` attribute is used if it has one.
        class_names: names for the per-class table (default: the store's, else ``class_<k>``).
        alphas: levels of the coverage-vs-α sweep (thresholds from the stored calibration curve on the coarse grid).
        confidence: level of the risk intervals (Clopper–Pearson when the loss is 0/B valued, else normal).
        n_examples: set-size maps kept per split (first images), for the report.
        example_width: the maps are subsampled (by a stride) to at most this width.

    Returns:
        JSON-friendly dict: ``method``, ``params``, ``alpha``, ``threshold``, ``risk_bound``, ``calibration``
        (``n_images``, ``empirical_risk``, ``set_size``, ``curve`` {grid, risk, set_size}), ``class_names`` and
        ``splits`` {name: {``n_images``, ``risk``, ``risk_ci``, ``interval``, ``meets_alpha``, ``coverage`` (1 − risk/B,
        for 0/B losses the share of images meeting the target), ``pixel_coverage`` (valid pixels whose true class is
        in the set — for a mask: the recall of its class), ``mean_set_size`` (classes per valid pixel; mask: share of
        pixels in the mask), ``per_class`` {class: {pixels, coverage, mean_set_size}}, ``subsets`` {name: same
        risk/coverage/set-size keys}, ``sweep`` [{alpha, threshold, risk}], ``examples`` [{name, set_size}]}}.
    """
    if not isinstance(controller, RiskControl):
        raise TypeError(f"`controller` must be a segcal.conformal risk controller, got {type(controller).__name__}")
    if fit_source is not None:
        controller.fit(fit_source)
    controller._check_fitted()
    eval_sources = dict(eval_sources or {})
    for name in eval_sources:
        if not isinstance(name, str):
            raise TypeError(f"`eval_sources` keys must be split names (str), got {name!r}")
    if subsets is None:
        found = [getattr(s, "subsets", None) for s in (fit_source, *eval_sources.values())]
        merged: dict[str, list[str]] = {}
        for f in found:
            if isinstance(f, Mapping):
                for k, v in f.items():
                    merged.setdefault(str(k), []).extend(str(x) for x in v)
        subsets = merged
    if class_names is None:
        for s in (*eval_sources.values(), fit_source):
            class_names = getattr(s, "class_names", None)
            if class_names:
                break
    c = controller.num_classes_
    class_names = [str(x) for x in class_names] if class_names else [f"class_{k}" for k in range(c)]
    if len(class_names) != c:
        raise ValueError(f"`class_names` has {len(class_names)} names but the controller was fitted with C={c}")
    lam = controller.threshold_
    sweep_lams = [controller.threshold_for(a) for a in alphas]
    grid = torch.unique(torch.cat([controller.grid_, torch.tensor([lam], dtype=torch.float64)]))
    at = int(torch.searchsorted(grid, torch.tensor([lam], dtype=torch.float64))[0])
    sweep_idx = torch.searchsorted(grid, torch.tensor(sweep_lams, dtype=torch.float64))

    curve_idx = torch.linspace(0, controller.grid_.numel() - 1, min(101, controller.grid_.numel())).round().long()
    out: dict[str, Any] = {
        "method": type(controller).__name__,
        "params": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else repr(v))
                   for k, v in controller.get_params().items()},
        "alpha": controller.alpha,
        "threshold": lam,
        "risk_bound": controller.risk_bound_,
        "feasible": controller.feasible_,
        "class_names": class_names,
        "confidence": confidence,
        "calibration": {
            "n_images": controller.n_calibration_,
            "empirical_risk": controller.empirical_risk_,
            "set_size": controller.set_size_,
            "curve": {"grid": controller.grid_[curve_idx].tolist(),
                      "risk": controller.risk_curve_[curve_idx].tolist(),
                      "set_size": controller.set_size_curve_[curve_idx].tolist()},
        },
        "splits": {},
    }
    for split, data in eval_sources.items():
        out["splits"][split] = _evaluate_split(controller, data, grid, at, sweep_idx, list(alphas), sweep_lams,
                                               subsets, class_names, confidence, n_examples, example_width)
    return _json(out)


def _evaluate_split(ctrl: RiskControl, data: object, grid: Tensor, at: int, sweep_idx: Tensor,
                    alphas: list[float], sweep_lams: list[float], subsets: Mapping[str, Sequence[str]],
                    class_names: list[str], confidence: float, n_examples: int, width: int) -> dict[str, Any]:
    lam = ctrl.threshold_
    c = ctrl.num_classes_
    names: list[str] = []
    loss_at, loss_sweep, counted_all, valid_n, size_sum, cls_stats, examples = [], [], [], [], [], [], []
    for logits, target, bnames in Source(data, ignore_index=ctrl.ignore_index, batch_size=ctrl.batch_size):
        if logits.shape[1] != c:
            raise ValueError(f"evaluation logits have C={logits.shape[1]} classes but the controller was fitted with "
                             f"C={c}")
        valid = ctrl._valid(target)
        scores = ctrl.scores(logits)
        losses, counted = ctrl._curves(scores, target, valid, grid)
        sizes = ctrl._set_sizes(scores, valid, grid)
        sets = scores <= lam
        tgt = torch.where(valid, target, 0)
        onehot = torch.nn.functional.one_hot(tgt, c).permute(0, 3, 1, 2).bool() & valid[:, None]
        if sets.shape[1] == c:
            hit = sets.gather(1, tgt[:, None])[:, 0] & valid
            per_pix_size = sets.sum(1)
        else:  # a single mask (FNR): "covered" means detected, the set size is mask membership
            hit = sets[:, 0] & valid
            per_pix_size = sets[:, 0].long()
        stats = torch.stack([onehot.flatten(2).sum(2),
                             (onehot & hit[:, None]).flatten(2).sum(2),
                             (onehot * per_pix_size[:, None]).flatten(2).sum(2)], 2)  # (N, C, 3)
        names += bnames
        loss_at.append(losses[:, at])
        loss_sweep.append(losses[:, sweep_idx])
        counted_all.append(counted)
        valid_n.append(valid.flatten(1).sum(1))
        size_sum.append(sizes[:, at])
        cls_stats.append(stats)
        for i in range(logits.shape[0]):
            if len(examples) < n_examples:
                step = max(1, math.ceil(logits.shape[3] / width))
                examples.append({"name": bnames[i], "set_size": per_pix_size[i, ::step, ::step].tolist(),
                                 "valid": valid[i, ::step, ::step].tolist()})
    L = torch.cat(loss_at)
    S = torch.cat(loss_sweep)
    cnt = torch.cat(counted_all)
    V = torch.cat(valid_n)
    Z = torch.cat(size_sum)
    K = torch.cat(cls_stats)

    mask_class = ctrl._mask_class()

    def summary(sel: Tensor) -> dict[str, Any]:
        res = _risk_summary(L[sel & cnt], ctrl.bound, ctrl.alpha, confidence)
        res["coverage"] = None if res["risk"] is None else 1.0 - res["risk"] / ctrl.bound
        ks = K[sel] if mask_class is None else K[sel][:, mask_class:mask_class + 1]
        pos = ks[:, :, 0].sum()
        res["pixel_coverage"] = float(ks[:, :, 1].sum().double() / pos) if pos > 0 else None
        pix = int(V[sel].sum())
        res["mean_set_size"] = float(Z[sel].sum().double() / pix) if pix > 0 else None
        return res

    res = summary(torch.ones(len(names), dtype=torch.bool))
    per_class = {}
    tot = K.sum(0)
    for k, cname in enumerate(class_names):
        p = int(tot[k, 0])
        per_class[cname] = {"pixels": p, "coverage": float(tot[k, 1]) / p if p else None,
                            "mean_set_size": float(tot[k, 2]) / p if p else None}
    res["per_class"] = per_class
    index = {n: i for i, n in enumerate(names)}
    res["subsets"] = {}
    for sname, members in subsets.items():
        ids = [index[m] for m in members if m in index]
        if not ids:
            continue
        sel = torch.zeros(len(names), dtype=torch.bool)
        sel[ids] = True
        res["subsets"][sname] = summary(sel)
    res["sweep"] = [{"alpha": a, "threshold": t, "risk": float(S[cnt][:, j].mean()) if cnt.any() else None}
                    for j, (a, t) in enumerate(zip(alphas, sweep_lams, strict=True))]
    res["examples"] = examples
    return res


def _json(v: Any) -> Any:
    if isinstance(v, Tensor):
        v = v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
