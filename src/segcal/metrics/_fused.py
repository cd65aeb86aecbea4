"""Fused CPU kernels for ``CalibrationMetrics.update`` (``_fused.cpp``), with the pure-PyTorch twins they must equal.

Three passes replace about sixty tensor operations of the update:

- :func:`labels`: validity (``ignore_index``, excluded classes), int32 labels and the label range check;
- :func:`dense_rows` reads each pixel's C logits (or probabilities) once, image row by image row, rows spread over
  threads: softmax (:func:`softmax`), top-label confidence, the first argmax of the logits, ``p_y``, the
  classwise-ECE histogram, the Brier sum and the NLL row sums (``log s - (x_y - max x)`` with :func:`log_twin`);
- :func:`pixel_hist` reads the per-pixel results of a batch once: the top-label histograms (per image and region),
  the fine adaptive-ECE histogram, the classwise positives and the confusion matrix.

Each kernel computes every slot and every summed value by the same IEEE float32 operations as its PyTorch twin here
(``ceil`` of float32 products for slots; ``round(v * 2**32)``, half to even, for summed values; the softmax and log
as fixed operation sequences), all sums but the NLL's are integer sums, which are exact, and the NLL is summed per
image row in pixel order — so the results are **bit-identical** to the twins for any number of threads (tested).
The twins are the CUDA, float64 and no-compiler path.

On by default for float32 CPU inputs; ``SEGCAL_FUSED=0`` switches it off. The first use builds the kernels with the
system C++ compiler (``$CXX`` or ``g++``/``c++``, about two seconds, no torch headers) into ``$SEGCAL_EXT_DIR``
(default ``~/.cache/segcal/ext``), keyed by the source, flags and CPU; later processes load the cached library.
Threads are OpenMP threads of the process's ``libgomp`` — PyTorch's own when it uses one; a compiler without OpenMP
(Apple clang) builds a one-thread kernel with the same results. Without a compiler the PyTorch twins are used, with
one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from segcal.metrics._binning import ace_fine_index, slot_index, to_units

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("_fused.cpp")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# tried in order: not every compiler knows -march=native (clang on arm64) or OpenMP (Apple clang); the kernel gives
# the same results with any of them, only its speed differs
_OPTIONAL_FLAGS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_lib: ctypes.CDLL | None = None
_failed = False
_lock = threading.Lock()

_I64, _I32, _VP = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_SIGNATURES = {
    "segcal_labels": [_VP, _I64, _I64, _I32, _I64, _VP, _VP, _VP, _I32],
    "segcal_dense_rows": [_VP, _I32, _VP, _VP, _I64, _I64, _I64, _I64, _I32, _I32, _VP, _VP, _VP, _VP, _VP, _VP,
                          _I32],
    "segcal_pixel_hist": [_VP, _VP, _VP, _VP, _VP, _VP, _I64, _I64, _I64, _I32, _I64, _I64, _I32, _VP, _VP, _VP, _VP,
                          _I32],
}


def enabled() -> bool:
    """Not switched off with ``SEGCAL_FUSED=0`` (read at each call, so tests and benchmarks can switch it)."""
    return os.environ.get("SEGCAL_FUSED", "1") != "0"


def available() -> bool:
    """Whether the kernels are (or can be) built here (builds them on the first call)."""
    return _load() is not None


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compile(out: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        for extra in _OPTIONAL_FLAGS:
            res = subprocess.run([cxx, *_FLAGS, *extra, str(_SOURCE), "-o", str(lib)], capture_output=True, text=True)
            if res.returncode == 0:
                os.replace(lib, out)  # atomic: a concurrent process sees the whole library or none
                return
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "compiler failed")


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    with _lock:
        if _lib is not None or _failed:
            return _lib
        try:
            flags = " ".join(_FLAGS + [f for extra in _OPTIONAL_FLAGS for f in extra])
            key = hashlib.sha256(_SOURCE.read_bytes() + flags.encode() + _cpu_key().encode()).hexdigest()
            folder = Path(os.environ.get("SEGCAL_EXT_DIR", Path.home() / ".cache" / "segcal" / "ext"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"segcal_fused_{key[:16]}.so"
            if not path.exists():
                _log.info("building the fused metric kernels into %s", path)
                _compile(path)
            lib = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                getattr(lib, name).argtypes = argtypes
            lib.segcal_dense_rows.restype = ctypes.c_int32
            lib.segcal_labels.restype = ctypes.c_int32
            lib.segcal_pixel_hist.restype = None
            _lib = lib
        except Exception as err:  # no compiler / unwritable cache: the PyTorch twins are always correct
            _failed = True
            warnings.warn(f"segcal: fused metric kernels unavailable ({err}); using the slower PyTorch path",
                          RuntimeWarning, stacklevel=3)
        return _lib


def fused_applies(t: Tensor) -> bool:
    """Whether the kernels will handle ``t``: float32 on the CPU, switched on and built."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and enabled() and _load() is not None



# ------------------------------------------------------------------------------------------------ labels
def labels(target: Tensor, num_classes: int, ignore_index: int | None, exclude: tuple[int, ...],
           *, fused: bool) -> tuple[Tensor, Tensor] | None:
    """``(y, valid)``: (N, H, W) int32 labels (0 where invalid) and the mask of pixels that are neither
    ``ignore_index`` nor an excluded class. With ``fused`` (the CPU kernels are in use) one kernel pass, which
    returns ``None`` if a valid label lies outside ``[0, C)``; otherwise PyTorch ops (labels assumed checked)."""
    if not fused:
        valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        for k in exclude:
            valid &= target != k
        return torch.where(valid, target, 0).to(torch.int32), valid
    t64 = target.to(torch.int64).contiguous()
    y = torch.empty(target.shape, dtype=torch.int32)
    valid = torch.empty(target.shape, dtype=torch.bool)
    flags = None
    if exclude:
        flags = torch.zeros(num_classes, dtype=torch.uint8)
        flags[list(exclude)] = 1
    status = _lib.segcal_labels(t64.data_ptr(), t64.numel(), num_classes, int(ignore_index is not None),
                                0 if ignore_index is None else int(ignore_index), _ptr(flags), y.data_ptr(),
                                valid.data_ptr(), torch.get_num_threads())
    return None if status else (y, valid)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ------------------------------------------------------------------------------------------------ dense step
def _softmax_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 ``(e, s, d)``: ``d = x - max``, ``e = exp(d)`` (the kernel's ``exp_nonpositive``), ``s = sum_k e_k``."""
    d = x - x.amax(1, keepdim=True)
    k = d * 1.44269504088896341 + 12582912.0  # 1.5 * 2**23: rounds to an integer, half to even
    k -= 12582912.0
    r = d - k * 0.693359375
    r -= k * -2.12194440e-4
    q = r * 1.9875691500e-4 + 1.3981999507e-3
    for coef in (8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        q = q * r + coef
    e = q * (r * r) + r + 1.0
    scale = torch.bitwise_left_shift(k.to(torch.int32) + 127, 23).view(torch.float32)
    e = torch.where(d < -87.0, 0.0, e * scale)
    s = torch.zeros_like(e[:, 0])
    for c in range(e.shape[1]):
        s += e[:, c]
    return e, s, d


def softmax(x: Tensor) -> Tensor:
    """Softmax over dim 1 — for float32, the exact twin of the kernel's (``softmax_row`` in ``_fused.cpp``).

    ``m = max_k x_k``, ``e_k = exp(x_k - m)`` by one fixed sequence of float32 operations (Cody-Waite reduction,
    Cephes' degree-5 polynomial, about 1 ulp from the true exp; 0 below ``x_k - m = -87``), ``s = e_0 + e_1 + ...``
    in class order, ``p_k = e_k / s``: every step is one correctly rounded IEEE operation, so the result is the
    same on CPU, CUDA and in the kernel. It differs from ``torch.softmax`` by a few ulp at most. Float64 inputs use
    ``torch.softmax``.
    """
    if x.dtype != torch.float32:
        return torch.softmax(x, 1)
    e, s, _ = _softmax_parts(x)
    return e.div_(s.unsqueeze(1))


def log_twin(v: Tensor) -> Tensor:
    """float32 natural log of normal positive values, the exact twin of the kernel's ``log_positive`` (Cephes'
    logf: ``v = 2**e m``, m in [sqrt(1/2), sqrt(2)), a degree-8 polynomial in ``m - 1``; about 1 ulp)."""
    bits = v.view(torch.int32)
    e = torch.bitwise_right_shift(bits, 23).bitwise_and_(0xFF).sub_(126)
    f = bits.bitwise_and(0x7FFFFF).bitwise_or_(0x3F000000).view(torch.float32)  # in [1/2, 1)
    low = f < 0.707106781186547524
    e = torch.where(low, e - 1, e)
    f = torch.where(low, (f + f) - 1.0, f - 1.0)
    z = f * f
    y = torch.full_like(f, 7.0376836292e-2)
    for coef in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * f + coef
    y = (y * f) * z
    fe = e.to(torch.float32)
    y = y + fe * -2.12194440e-4
    y = y + z * -0.5
    return (f + y) + fe * 0.693359375


def dense_rows(x: Tensor, logits: bool, y: Tensor, valid: Tensor, n: int, classwise: bool) -> tuple[Tensor, ...]:
    """``(conf, pred, p_y, cw, brier, nll_rows)`` of (N, C, H, W) scores, (N, H, W) labels (0 where invalid), mask.

    With ``p = softmax(x)`` if ``logits`` else ``x``: ``conf = max_k p_k``, ``pred`` = first argmax of ``x``
    (int32; for logits the model's prediction — a tie of probabilities that the logits break is not a tie),
    ``p_y = p[y]``; over valid pixels, ``cw`` (C, n + 1) int64 sums ``to_units(p_k)`` by ``slot_index(p_k, n)``
    (empty if not ``classwise``), ``brier`` (0-dim int64) sums ``to_units((sum_k p_k^2 - 2 p_y) + 1)`` (float32,
    squares in class order)
    and ``nll_rows`` (N, H) float64 sums the NLL of each image row in pixel order — ``log s - (x_y - max x)`` for
    logits (exact for any p_y, no underflow), ``-log max(p_y, tiny)`` for probabilities.

    Raises ``ValueError`` (fused path) for NaN/inf logits or a valid label outside [0, C).
    """
    if fused_applies(x):
        return _dense_rows_fused(x.contiguous(), logits, y, valid, n, classwise)
    return _dense_rows_torch(x, logits, y, valid, n, classwise)


def _dense_rows_fused(x: Tensor, logits: bool, y: Tensor, valid: Tensor, n: int,
                      classwise: bool) -> tuple[Tensor, ...]:
    n_img, c, h, w = x.shape
    conf = torch.empty(n_img, h, w, dtype=torch.float32)
    pred = torch.empty(n_img, h, w, dtype=torch.int32)
    p_y = torch.empty_like(conf)
    cw = torch.zeros(c if classwise else 0, n + 1, dtype=torch.int64)
    brier = torch.zeros((), dtype=torch.int64)
    nll_rows = torch.empty(n_img, h, dtype=torch.float64)
    y32 = y.to(torch.int32).contiguous()
    ok = valid.contiguous()
    status = _lib.segcal_dense_rows(x.data_ptr(), int(logits), y32.data_ptr(), ok.data_ptr(), n_img, c, h, w, n,
                                    int(classwise), conf.data_ptr(), pred.data_ptr(), p_y.data_ptr(), cw.data_ptr(),
                                    brier.data_ptr(), nll_rows.data_ptr(), torch.get_num_threads())
    if status == 1:
        raise ValueError("`preds` contains NaN or inf values")
    if status == 2:
        raise ValueError(f"`target` has labels outside [0, {c}) that are not ignored")
    return conf, pred, p_y, cw, brier, nll_rows


def first_argmax(x: Tensor, top: Tensor) -> Tensor:
    """Index of the first class equal to the max ``top`` (int32).

    ``max(C - k)`` over the classes that attain the maximum is a plain reduction over dim 1, which is several
    times faster than ``argmax(dim=1)`` on (N, C, H, W) CPU tensors. The equality mask is reused in place.
    """
    c = x.shape[1]
    wdt = torch.uint8 if c < 256 else torch.int32
    w = torch.arange(c, 0, -1, dtype=wdt, device=x.device).view(1, c, 1, 1)
    hit = torch.eq(x, top.unsqueeze(1))
    hit = hit.view(torch.uint8).mul_(w) if wdt == torch.uint8 else hit * w
    return c - hit.amax(1).to(torch.int32)


def _dense_rows_torch(x: Tensor, logits: bool, y: Tensor, valid: Tensor, n: int,
                      classwise: bool) -> tuple[Tensor, ...]:
    c = x.shape[1]
    y = y.long()
    if not logits:
        p = x
    elif x.dtype == torch.float32:
        e, s, d = _softmax_parts(x)
        p = e.div_(s.unsqueeze(1))
    else:
        p = torch.softmax(x, 1)
    conf = p.amax(1)  # = p[pred] for logits: e = exp(0) = 1 there, so p = 1 / s, the largest
    pred = first_argmax(x, x.amax(1))
    p_y = p.gather(1, y.unsqueeze(1)).squeeze(1)
    cw = torch.zeros(c if classwise else 0, n + 1, dtype=torch.int64, device=p.device)
    if classwise:
        row = torch.arange(c, dtype=torch.int32, device=p.device).mul_(n + 1).view(1, c, 1, 1)
        idx = slot_index(p, n).add_(row).masked_fill_(~valid.unsqueeze(1), c * (n + 1))
        vals = to_units(p)
        acc = torch.zeros(c * (n + 1) + 1, dtype=vals.dtype, device=p.device)
        cw = acc.index_add_(0, idx.flatten(), vals.flatten())[:-1].view(c, n + 1)
    if p.dtype == torch.float64:
        per_pixel = torch.square(p).sum(1).sub_(p_y, alpha=2).add_(1.0).masked_fill_(~valid, 0.0)
    else:  # float32, squares summed in class order, as in the kernel
        sq = torch.zeros_like(p_y)
        for k in range(c):
            sq += p[:, k] * p[:, k]
        per_pixel = to_units((sq - 2.0 * p_y) + 1.0).masked_fill_(~valid, 0)
    tiny = torch.finfo(p.dtype).tiny
    if not logits:
        nll = -(log_twin(p_y.clamp_min(tiny)) if p.dtype == torch.float32 else torch.log(p_y.clamp_min(tiny)))
    elif x.dtype == torch.float32:
        nll = log_twin(s) - d.gather(1, y.unsqueeze(1)).squeeze(1)
    else:
        nll = torch.logsumexp(x, 1) - x.gather(1, y.unsqueeze(1)).squeeze(1)
    # cumsum adds in element order, as the kernel does
    nll_rows = nll.masked_fill(~valid, 0.0).to(torch.float64).cumsum(-1)[..., -1]
    return conf, pred, p_y, cw, per_pixel.sum(), nll_rows


# ------------------------------------------------------------------------------------------------ pixel step
def pixel_hist(conf: Tensor, pred: Tensor, p_y: Tensor, y: Tensor, valid: Tensor, region: Tensor | None, n: int,
               n_regions: int, num_classes: int, resolution: int, classwise: bool) -> tuple[Tensor, ...]:
    """``(top, top_sum, fine, fine_sum, pos, confmat)``: histograms of a batch's (N, H, W) per-pixel results over
    valid pixels.

    ``top`` (N, R, n + 1, 2) counts pixels and correct pixels by image, region and ``slot_index(conf, n)``,
    ``top_sum`` (N, R, n + 1) sums ``to_units(conf)`` there; ``fine`` (resolution, 2) / ``fine_sum`` the same by
    ``ace_fine_index(conf)``; ``pos`` (C, n + 1) counts pixels by label and ``slot_index(p_y, n)`` (zeros if not
    ``classwise``); ``confmat`` (C, C) by label and prediction.
    """
    if fused_applies(conf) and 4 * (num_classes**2 + 1) < 2**31:  # the kernel's offsets are int32
        return _pixel_hist_fused(conf, pred, p_y, y, valid, region, n, n_regions, num_classes, resolution, classwise)
    return _pixel_hist_torch(conf, pred, p_y, y, valid, region, n, n_regions, num_classes, resolution, classwise)


def _pixel_hist_fused(conf: Tensor, pred: Tensor, p_y: Tensor, y: Tensor, valid: Tensor, region: Tensor | None,
                      n: int, n_regions: int, num_classes: int, resolution: int,
                      classwise: bool) -> tuple[Tensor, ...]:
    n_img = conf.shape[0]
    top = torch.zeros(n_img, n_regions, n + 1, 3, dtype=torch.int64)
    fine = torch.zeros(resolution, 3, dtype=torch.int64)
    pos = torch.zeros(num_classes, n + 1, dtype=torch.int64)
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    y32 = y.to(torch.int32).contiguous()
    reg = None if region is None else region.to(torch.int32).contiguous()
    args = [t.contiguous() for t in (conf, pred, p_y)]
    _lib.segcal_pixel_hist(*(_ptr(t) for t in args), y32.data_ptr(), valid.contiguous().data_ptr(), _ptr(reg),
                           n_img, conf[0].numel(), num_classes, n, n_regions, resolution, int(classwise),
                           top.data_ptr(), fine.data_ptr(), pos.data_ptr(), confmat.data_ptr(),
                           torch.get_num_threads())
    return top[..., :2], top[..., 2], fine[:, :2], fine[:, 2], pos, confmat


def _count(idx: Tensor, size: int, weights: Tensor | None = None) -> Tensor:
    """``bincount`` of an int32 index known to be < ``size`` (``index_add_`` skips bincount's min/max passes)."""
    idx = idx.flatten()
    src = torch.ones(1, dtype=torch.int64, device=idx.device).expand(idx.numel()) if weights is None else weights
    return torch.zeros(size, dtype=src.dtype, device=idx.device).index_add_(0, idx, src.flatten())


def _pixel_hist_torch(conf: Tensor, pred: Tensor, p_y: Tensor, y: Tensor, valid: Tensor, region: Tensor | None,
                      n: int, n_regions: int, num_classes: int, resolution: int,
                      classwise: bool) -> tuple[Tensor, ...]:
    n_img, dev, invalid = conf.shape[0], conf.device, ~valid
    y32 = y.to(torch.int32)
    hit = (pred == y32).to(torch.int64)
    u = to_units(conf)
    cells = n_img * n_regions * (n + 1)
    cell = torch.arange(n_img, dtype=torch.int32, device=dev).view(-1, 1, 1) * (n_regions * (n + 1))
    if region is not None:
        cell = cell + region.to(torch.int32) * (n + 1)
    tidx = slot_index(conf, n).add_(cell).masked_fill_(invalid, cells)
    top = torch.stack([_count(tidx, cells + 1), _count(tidx, cells + 1, hit)], -1)[:-1]
    top_sum = _count(tidx, cells + 1, u)[:-1]
    fidx = ace_fine_index(conf, resolution).masked_fill_(invalid, resolution)
    fine = torch.stack([_count(fidx, resolution + 1), _count(fidx, resolution + 1, hit)], -1)[:-1]
    fine_sum = _count(fidx, resolution + 1, u)[:-1]
    pos = torch.zeros(num_classes, n + 1, dtype=torch.int64, device=dev)
    if classwise:
        pidx = (y32 * (n + 1)).add_(slot_index(p_y, n)).masked_fill_(invalid, num_classes * (n + 1))
        pos = _count(pidx, num_classes * (n + 1) + 1)[:-1].view(num_classes, n + 1)
    cidx = (y32 * num_classes).add_(pred).masked_fill_(invalid, num_classes * num_classes)
    confmat = _count(cidx, num_classes * num_classes + 1)[:-1].view(num_classes, num_classes)
    shape = (n_img, n_regions, n + 1)
    return top.view(*shape, 2), top_sum.view(shape), fine, fine_sum, pos, confmat
