"""ASLP: adaptive stochastic label perturbation — SC-BCE with a per-image perturbation probability α_i.

The binary loss and α update follow the released code (calibration-targeted variant). ``sc_ce`` and
``ASLP(multiclass=True)`` are **segcal's extension** to multi-class segmentation, not part of the paper.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcal._checks import FLOAT_DTYPES, check_finite, check_target, check_tensor
from segcal.losses._common import check_reduction, compute_dtype, prepare, reduce_loss

PROB_CLAMP = 1e-7


def _check_binary(logits: object, target: object, ignore_index: int | None, reduction: str
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(logits (B,H,W) in compute dtype, target as float 0/1 with ignore→0, valid mask)``."""
    check_reduction(reduction)
    logits = check_tensor(logits, "logits")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`logits` must be a floating tensor, got {logits.dtype}")
    if logits.ndim == 4 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 3:
        raise ValueError(f"`logits` must have shape (B, 1, H, W) or (B, H, W) for the binary task, got "
                         f"{tuple(logits.shape)}")
    check_finite(logits, "logits")
    target = check_target(target, 2, ignore_index, shape=tuple(logits.shape))
    logits = logits.to(compute_dtype(logits))
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    y = torch.where(valid, target, torch.zeros_like(target)).to(logits.dtype)
    return logits, y, valid


def _check_beta(beta: float, upper: float, name: str = "beta") -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 < beta <= upper):
        raise ValueError(f"`{name}` must be in (0, {upper:g}], got {beta!r}")
    return float(beta)


def _per_image(alpha: float | Tensor, batch: int, device: torch.device, name: str = "alpha") -> Tensor:
    a = torch.as_tensor(alpha, dtype=torch.float64)
    if a.ndim == 0:
        a = a.expand(batch)
    if a.shape != (batch,):
        raise ValueError(f"`{name}` must be a float or a ({batch},) tensor, got shape {tuple(a.shape)}")
    if not ((a >= 0) & (a <= 1)).all():
        raise ValueError(f"`{name}` must lie in [0, 1]")
    return a.to(device)


def draw_perturbation(alpha: float | Tensor, batch: int, generator: torch.Generator | int | None = None) -> Tensor:
    """One Bernoulli(α_i) draw per image, on the CPU generator so results do not depend on the device.

    Args:
        alpha: perturbation probability, a float or one per image.
        batch: number of images ``B``.
        generator: a CPU ``torch.Generator``, an int seed, or ``None`` (global RNG).

    Returns:
        ``(B,)`` bool tensor ``Z``.
    """
    a = _per_image(alpha, batch, torch.device("cpu"))
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    return torch.rand(batch, dtype=torch.float64, generator=generator) < a


def _resolve_z(z: Tensor | None, alpha: float | Tensor, batch: int, generator: torch.Generator | int | None,
               device: torch.device, dtype: torch.dtype) -> Tensor:
    if z is None:
        z = draw_perturbation(alpha, batch, generator)
    z = torch.as_tensor(z)
    if z.shape != (batch,):
        raise ValueError(f"`z` must have shape ({batch},), got {tuple(z.shape)}")
    if not ((z == 0) | (z == 1)).all():
        raise ValueError("`z` must hold 0/1 (or bool) values")
    return z.to(device=device, dtype=dtype).reshape(batch, 1, 1)


def sc_bce(logits: Tensor, target: Tensor, alpha: float | Tensor = 0.0, beta: float = 2.0, *,
           z: Tensor | None = None, generator: torch.Generator | int | None = None, ignore_index: int | None = 255,
           reduction: str = "mean") -> Tensor:
    r"""Self-calibrating binary cross-entropy (SC-BCE) with one stochastic label perturbation per image.

    .. math:: Z_i \sim \mathrm{Bernoulli}(\alpha_i), \qquad
              t(i) = \begin{cases} y & Z_i = 0 \\ (1 - 2\beta)\,y + \beta & Z_i = 1 \end{cases}, \qquad
              L = \frac{1}{|V|} \sum_{\text{valid pixels}} \mathrm{BCE}(\sigma(x), t)

    Since BCE is linear in the target, :math:`\mathbb E_Z[L]` is BCE against label-smoothed targets
    :math:`(1 - \epsilon) y + \epsilon / 2` with :math:`\epsilon = 2 \alpha_i \beta`. ``β = 1/2`` gives all-0.5
    targets, ``β = 1`` flips the labels; the default ``β = 2`` (released code) gives targets outside [0, 1], which
    BCE-with-logits accepts.

    Args:
        logits: one sigmoid logit per pixel.
        target: binary labels ``{0, 1}`` with ``ignore_index`` for unlabelled pixels.
        alpha: perturbation probability per image (float or ``(B,)``), in [0, 1].
        beta: perturbation magnitude ``> 0``.
        z: optional explicit ``(B,)`` 0/1 draws (then ``alpha`` and ``generator`` are unused).
        generator: CPU ``torch.Generator`` or int seed for the draws.
        ignore_index: label excluded from the loss and the mean.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, 1, H, W)` or :math:`(B, H, W)`; target: :math:`(B, H, W)`;
          output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Liu et al., "Model Calibration in Dense Classification with Adaptive Label Perturbation", ICCV 2023,
        arXiv 2307.13539 (code: Carlisle-Liu/ASLP).

    Example:
        >>> import torch
        >>> logits, target = torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4, 8, 8))
        >>> sc_bce(logits, target, alpha=0.2, beta=2.0, generator=0).shape
        torch.Size([])
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
    x, y, valid = _check_binary(logits, target, ignore_index, reduction)
    zz = _resolve_z(z, alpha, x.shape[0], generator, x.device, x.dtype)
    t = y + zz * beta * (1 - 2 * y)
    per_pixel = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    return reduce_loss(per_pixel, valid, reduction)


def sc_ce(logits: Tensor, target: Tensor, alpha: float | Tensor = 0.0, beta: float = 1.0, *,
          z: Tensor | None = None, generator: torch.Generator | int | None = None, ignore_index: int | None = 255,
          reduction: str = "mean") -> Tensor:
    r"""segcal's multi-class extension of SC-BCE (not in the ASLP paper).

    .. math:: t(i) = (1 - Z_i \beta')\,\mathrm{onehot}(y_i) + Z_i \beta' / C, \qquad
              \mathbb E_Z[t] = (1 - \alpha_i \beta')\,\mathrm{onehot} + \alpha_i \beta' / C

    ``0 < β' ≤ C / (C − 1)`` keeps even a perturbed target a probability distribution (``β' = 1``: uniform).
    For ``C = 2`` this is exactly :func:`sc_bce` on the logit difference with ``β = β' / 2``.

    Args:
        logits: raw scores.
        target: class indices with ``ignore_index`` for unlabelled pixels.
        alpha: perturbation probability per image (float or ``(B,)``), in [0, 1].
        beta: ``β'``, the smoothing mass of a perturbed image.
        z: optional explicit ``(B,)`` 0/1 draws.
        generator: CPU ``torch.Generator`` or int seed for the draws.
        ignore_index: label excluded from the loss and the mean.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, C, H, W)`; target: :math:`(B, H, W)`; output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Extension of Liu et al., ICCV 2023, arXiv 2307.13539.

    Example:
        >>> import torch
        >>> sc_ce(torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4)), alpha=0.5, generator=0).shape
        torch.Size([])
    """
    x, target, valid, safe = prepare(logits, target, ignore_index, reduction)
    c = x.shape[1]
    beta = _check_beta(beta, c / (c - 1))
    eps = _resolve_z(z, alpha, x.shape[0], generator, x.device, x.dtype) * beta
    logp = F.log_softmax(x, dim=1)
    nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    per_pixel = (1 - eps) * nll + eps * (-logp.mean(dim=1))
    return reduce_loss(per_pixel, valid, reduction)


def alpha_bound(beta: float, multiclass: bool = False) -> float:
    """Where the released code resets α: ``1/(2β)`` (binary) or ``1/β'`` (multi-class extension)."""
    return 1 / beta if multiclass else 1 / (2 * beta)


def alpha_max(beta: float, multiclass: bool = False) -> float:
    """Value α is reset to when an update reaches :func:`alpha_bound`: ``bound − 0.01``, capped at 1."""
    return min(1.0, alpha_bound(beta, multiclass) - 0.01)


@torch.no_grad()
def aslp_alpha_update(alpha: Tensor, logits: Tensor, target: Tensor, val_accuracy: float, beta: float = 2.0,
                      eta: float = 0.002, lam: float = 2000.0, *, multiclass: bool = False,
                      ignore_index: int | None = 255) -> Tensor:
    r"""One step of ASLP's adaptive α update (calibration-targeted variant of the released code).

    Binary:

    .. math:: a_i = \alpha_i + \eta \Big[
              \frac{\mathrm{BCE}(p, 1 - y)_i - \mathrm{BCE}(p, y)_i}{\beta}
              + \lambda \min\big((1 - \mathrm{acc}_{val}) - \beta \alpha_i,\ 0\big) \Big], \qquad
              \alpha_i \leftarrow \begin{cases} 0 & a_i < 0 \\ \frac{1}{2\beta} - 0.01 & a_i \ge \frac{1}{2\beta} \\
              a_i & \text{otherwise} \end{cases}

    with per-image mean BCEs over valid pixels and ``p`` clamped to ``[1e-7, 1 − 1e-7]``. As in the released
    ``main_ASLP.py`` this is *not* a clip: a value in ``[1/(2β) − 0.01, 1/(2β))`` is kept unchanged, only a value
    reaching ``1/(2β)`` is reset to ``1/(2β) − 0.01``. (segcal also caps the reset value at 1, which matters only
    for β < 0.505.)

    Multi-class (segcal's extension): ``β`` is replaced by ``b = β'(C − 1)/C`` (the expected mass moved off the
    true class per unit α), ``BCE(p, y)`` by ``−log p_y`` and ``BCE(p, 1 − y)`` by ``−mean_{k≠y} log p_k``
    (cross-entropy against the target spread uniformly over the other classes), and the reset bound is ``1/β'``
    (reset value ``min(1, 1/β' − 0.01)``). For ``C = 2`` and ``β' = 2β`` this is exactly the binary rule.

    Args:
        alpha: current ``(B,)`` perturbation probabilities.
        logits: binary ``(B, 1, H, W)``/``(B, H, W)`` or multi-class ``(B, C, H, W)`` logits (no gradient).
        target: ``(B, H, W)`` labels.
        val_accuracy: held-out pixel accuracy in [0, 1].
        beta: ``β`` (binary) or ``β'`` (multi-class).
        eta: step size.
        lam: weight of the accuracy constraint.
        multiclass: use the multi-class rule.
        ignore_index: label excluded from the per-image means; images without valid pixels keep their α.

    Returns:
        The updated ``(B,)`` float64 α.

    Example:
        >>> import torch
        >>> aslp_alpha_update(torch.zeros(2), torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 4, 4)), 0.9).shape
        torch.Size([2])
    """
    if not (isinstance(val_accuracy, (int, float)) and 0 <= val_accuracy <= 1):
        raise ValueError(f"`val_accuracy` must be a number in [0, 1], got {val_accuracy!r}")
    if multiclass:
        x, target, valid, safe = prepare(logits, target, ignore_index, "mean")
        x = x.double()
        c = x.shape[1]
        beta = _check_beta(beta, c / (c - 1))
        logp = F.softmax(x, dim=1).clamp(PROB_CLAMP, 1 - PROB_CLAMP).log()
        own = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        flip = (-logp.sum(dim=1) - own) / (c - 1)
        b = beta * (c - 1) / c
    else:
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
        x, y, valid = _check_binary(logits, target, ignore_index, "mean")
        p = torch.sigmoid(x.double()).clamp(PROB_CLAMP, 1 - PROB_CLAMP)
        y = y.double()
        own = -(y * p.log() + (1 - y) * (1 - p).log())
        flip = -((1 - y) * p.log() + y * (1 - p).log())
        b = beta
    alpha = _per_image(alpha, x.shape[0], x.device).double()
    count = valid.flatten(1).sum(1)
    vf = valid.double()
    gap = ((flip - own) * vf).flatten(1).sum(1) / count.clamp_min(1)
    step = gap / b + lam * torch.clamp((1 - val_accuracy) - b * alpha, max=0)
    new = alpha + eta * step
    bound = alpha_bound(beta, multiclass)
    new = torch.where(new < 0, torch.zeros_like(new), new)
    new = torch.where(new >= bound, torch.full_like(new, alpha_max(beta, multiclass)), new.clamp_max(1.0))
    return torch.where(count > 0, new, alpha)


def _keys(ids: Iterable[Any] | Tensor, batch: int) -> list[Hashable]:
    if isinstance(ids, Tensor):
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"`ids` must be a sequence of image ids (str or int) or a 1-D tensor, got {type(ids).__name__}")
    keys: list[Hashable] = []
    for k in ids:
        if isinstance(k, str):
            keys.append(k)
        elif hasattr(k, "__index__") and not isinstance(k, bool):
            keys.append(int(k))
        else:
            raise TypeError(f"`ids` entries must be str or int, got {type(k).__name__}")
    if len(keys) != batch:
        raise ValueError(f"`ids` has {len(keys)} entries but the batch has {batch} images")
    return keys


class ASLP(nn.Module):
    r"""Adaptive stochastic label perturbation: SC-BCE (or the multi-class SC-CE) with per-image adaptive α.

    Each training image id keeps its own ``α_i`` (initially 0). ``forward`` draws ``Z_i ~ Bernoulli(α_i)`` from the
    module's own generator, returns the loss and — in training mode, from epoch ``warmup_epochs`` on (epochs count
    from 0) — updates ``α_i`` with :func:`aslp_alpha_update` using the detached logits of the same iteration. The
    trainer calls :meth:`on_epoch_start` with the held-out pixel accuracy every epoch. α, the epoch, the accuracy and
    the generator state live in ``state_dict()`` (``_extra_state``), so a checkpoint resumes the exact run.

    The paper's conservative variant (maximum-entropy inference constrained by the initial model's validation
    accuracy) is not implemented: the paper gives no update rule precise enough to reproduce.

    Args:
        beta: perturbation magnitude; ``None`` means 2.0 (binary, released code) or ``β' = 1.0`` (multi-class).
        eta: α step size.
        lam: weight of the accuracy constraint.
        warmup_epochs: epochs without α updates (released code: 5). α only moves when an image is seen again, so a
            schedule of a few epochs leaves ASLP equal to its base loss — lower this for short fine-tuning.
        multiclass: use segcal's multi-class extension (:func:`sc_ce`, ``(B, C, H, W)`` logits).
        seed: seed of the Bernoulli draws.
        ignore_index: label excluded from loss and update.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: binary :math:`(B, 1, H, W)`/:math:`(B, H, W)`, or :math:`(B, C, H, W)` with ``multiclass``.
        - target: :math:`(B, H, W)`; ids: ``B`` image ids.

    References:
        Liu et al., "Model Calibration in Dense Classification with Adaptive Label Perturbation", ICCV 2023,
        arXiv 2307.13539.

    Example:
        >>> import torch
        >>> loss_fn = ASLP(warmup_epochs=0)
        >>> loss_fn.on_epoch_start(0, val_accuracy=0.9)
        >>> loss = loss_fn(torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 4, 4)), ids=["a", "b"])
        >>> sorted(loss_fn.alpha_)
        ['a', 'b']
    """

    needs_ids = True

    def __init__(self, beta: float | None = None, eta: float = 0.002, lam: float = 2000.0, warmup_epochs: int = 5,
                 multiclass: bool = False, seed: int = 0, ignore_index: int | None = 255,
                 reduction: str = "mean") -> None:
        super().__init__()
        if beta is None:
            beta = 1.0 if multiclass else 2.0
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
        if not (isinstance(eta, (int, float)) and eta >= 0) or not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"`eta` and `lam` must be numbers >= 0, got eta={eta!r}, lam={lam!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be an int >= 0, got {warmup_epochs!r}")
        self.beta = float(beta)
        self.eta = float(eta)
        self.lam = float(lam)
        self.warmup_epochs = warmup_epochs
        self.multiclass = bool(multiclass)
        self.seed = int(seed)
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)
        self.alpha_: dict[Hashable, float] = {}
        self.epoch = 0
        self.val_accuracy: float | None = None
        self.generator = torch.Generator().manual_seed(self.seed)

    def on_epoch_start(self, epoch: int, val_accuracy: float | None = None) -> None:
        """Set the current (0-based) epoch and, when given, the held-out pixel accuracy used by the α update."""
        if val_accuracy is not None and not (0 <= float(val_accuracy) <= 1):
            raise ValueError(f"`val_accuracy` must be in [0, 1], got {val_accuracy!r}")
        self.epoch = int(epoch)
        if val_accuracy is not None:
            self.val_accuracy = float(val_accuracy)

    @property
    def updating(self) -> bool:
        return self.training and self.epoch >= self.warmup_epochs

    def alpha(self, ids: Iterable[Any] | Tensor) -> Tensor:
        """Current α of the given image ids (0 for unseen ids) as a float64 tensor."""
        keys = _keys(ids, len(ids))  # type: ignore[arg-type]
        return torch.tensor([self.alpha_.get(k, 0.0) for k in keys], dtype=torch.float64)

    def forward(self, logits: Tensor, target: Tensor, ids: Iterable[Any] | Tensor | None = None) -> Tensor:
        if ids is None:
            raise ValueError("ASLP needs the image ids of the batch: call loss(logits, target, ids=...)")
        batch = logits.shape[0] if isinstance(logits, Tensor) else -1
        keys = _keys(ids, batch)
        alpha = torch.tensor([self.alpha_.get(k, 0.0) for k in keys], dtype=torch.float64)
        z = draw_perturbation(alpha, batch, self.generator)
        fn = sc_ce if self.multiclass else sc_bce
        loss = fn(logits, target, alpha, self.beta, z=z, ignore_index=self.ignore_index, reduction=self.reduction)
        if self.updating:
            self.update(logits, target, keys)
        return loss

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor, ids: Iterable[Any] | Tensor) -> None:
        """Apply one α update for the images ``ids`` (``forward`` does this itself while training)."""
        if self.val_accuracy is None:
            raise RuntimeError("ASLP's α update needs the held-out accuracy: call on_epoch_start(epoch, "
                               "val_accuracy=...) before training past the warm-up")
        keys = _keys(ids, logits.shape[0])
        alpha = torch.tensor([self.alpha_.get(k, 0.0) for k in keys], dtype=torch.float64)
        new = aslp_alpha_update(alpha, logits.detach(), target, self.val_accuracy, self.beta, self.eta, self.lam,
                                multiclass=self.multiclass, ignore_index=self.ignore_index)
        for k, a in zip(keys, new.tolist()):
            self.alpha_[k] = a

    def get_extra_state(self) -> dict[str, Any]:
        return {"alpha": dict(self.alpha_), "epoch": self.epoch, "val_accuracy": self.val_accuracy,
                "rng_state": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.alpha_ = dict(state["alpha"])
        self.epoch = int(state["epoch"])
        self.val_accuracy = state["val_accuracy"]
        self.generator.set_state(state["rng_state"])

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, eta={self.eta}, lam={self.lam}, warmup_epochs={self.warmup_epochs}, "
                f"multiclass={self.multiclass}, images={len(self.alpha_)}")



class SCBCELoss(nn.Module):
    """Module twin of :func:`sc_bce` with one fixed α for every image (use :class:`ASLP` for the adaptive α).

    Example:
        >>> import torch
        >>> SCBCELoss(alpha=0.1, seed=0)(torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 4, 4))).shape
        torch.Size([])
    """

    def __init__(self, alpha: float = 0.0, beta: float = 2.0, seed: int = 0, ignore_index: int | None = 255,
                 reduction: str = "mean") -> None:
        super().__init__()
        if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return sc_bce(logits, target, self.alpha, self.beta, generator=self.generator,
                      ignore_index=self.ignore_index, reduction=self.reduction)
