"""Optional fused CPU kernel for the dense step of ``CalibrationMetrics.update`` (top label and classwise rows).

After the softmax (kept in PyTorch), one pass over each image row's C probabilities gives the top-label
confidence, the first argmax and ``p_y`` (exact operations) and the classwise-ECE row histograms, the costliest
step of the update. The pure-PyTorch step (``calibration._classwise_rows``) multiplies the probabilities by ``n``
(0 on invalid pixels), takes the slot ``ceil(n p)`` and adds ``n p`` into a per-row float32 histogram with
``index_add_`` (a serial loop in element order). This kernel does the same IEEE float32 operations in the same
order inside each row, in one read of the probabilities and with image rows spread over torch's intra-op threads
(``at::parallel_for``), so its results are **bit-identical** to the fallback (tested) and it uses every thread torch
is allowed.

Opt-in with ``SEGCAL_FUSED=1`` (the first use compiles it with ``torch.utils.cpp_extension.load_inline`` into a
cache folder, ``SEGCAL_EXT_DIR`` or ``~/.cache/segcal/ext``, which takes one to three minutes; later processes load
it in well under a second; FP contraction is off so no FMA changes a rounding). It is off by default so that no
process pays a compile it did not ask for. Without a C++ compiler or ninja :func:`classwise_rows` returns ``None``
(with one warning) and the caller uses the pure-PyTorch step. CUDA and float64 inputs always use the PyTorch step.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>

// p: (N, C, H, W) float32; y: (N, H, W) int64 labels in [0, C); weight: (N, H, W) float32 (n on valid pixels, else 0).
// Per pixel: conf = max_k p_k, pred = first k attaining it, p_y = p[y]. If classwise: rows (N, C, H, n + 1) float32,
// rows[i, c, h, s] = sum over w (in order) of p*weight where ceil(p*weight) == s (the index_add_ order per row).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> dense_stats(
    torch::Tensor p, torch::Tensor y, torch::Tensor weight, int64_t n, bool classwise) {
  TORCH_CHECK(p.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "float32 expected");
  TORCH_CHECK(y.dtype() == torch::kInt64, "int64 labels expected");
  TORCH_CHECK(p.is_contiguous() && weight.is_contiguous() && y.is_contiguous(), "contiguous tensors expected");
  const int64_t N = p.size(0), C = p.size(1), H = p.size(2), W = p.size(3), S = n + 1;
  auto conf = torch::empty({N, H, W}, p.options());
  auto pred = torch::empty({N, H, W}, p.options().dtype(torch::kInt32));
  auto p_y = torch::empty({N, H, W}, p.options());
  auto rows = classwise ? torch::zeros({N, C, H, S}, p.options()) : torch::empty({0}, p.options());
  const float* pp = p.data_ptr<float>();
  const int64_t* yy = y.data_ptr<int64_t>();
  const float* ww = weight.data_ptr<float>();
  float* cf = conf.data_ptr<float>();
  int32_t* pr = pred.data_ptr<int32_t>();
  float* py = p_y.data_ptr<float>();
  float* oo = classwise ? rows.data_ptr<float>() : nullptr;
  at::parallel_for(0, N * H, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = i * H + h: one image row, all classes
      const int64_t i = r / H, h = r % H;
      const int64_t pix = r * W;
      float* cmax = cf + pix;
      int32_t* arg = pr + pix;
      for (int64_t w = 0; w < W; ++w) { cmax[w] = -1.0f; arg[w] = 0; }
      for (int64_t c = 0; c < C; ++c) {
        const float* prow = pp + ((i * C + c) * H + h) * W;
        for (int64_t w = 0; w < W; ++w) {
          if (prow[w] > cmax[w]) { cmax[w] = prow[w]; arg[w] = static_cast<int32_t>(c); }
        }
        if (classwise) {
          const float* wrow = ww + pix;
          float* acc = oo + ((i * C + c) * H + h) * S;
          for (int64_t w = 0; w < W; ++w) {
            const float v = prow[w] * wrow[w];
            acc[static_cast<int64_t>(std::ceil(v))] += v;
          }
        }
      }
      for (int64_t w = 0; w < W; ++w) py[pix + w] = pp[((i * C + yy[pix + w]) * H + h) * W + w];
    }
  });
  return std::make_tuple(conf, pred, p_y, rows);
}
"""

_module: Any = None
_failed = False


def _load() -> Any:
    global _module, _failed
    if _module is not None or _failed:
        return _module
    try:
        from torch.utils.cpp_extension import load_inline

        folder = Path(os.environ.get("SEGCAL_EXT_DIR", Path.home() / ".cache" / "segcal" / "ext")) / "fused_v2"
        folder.mkdir(parents=True, exist_ok=True)
        _module = load_inline(name="segcal_fused_v2", cpp_sources=[_SOURCE], functions=["dense_stats"],
                              extra_cflags=["-O2", "-ffp-contract=off"], build_directory=str(folder),
                              verbose=False)
    except Exception as err:  # no compiler / ninja / headers: the PyTorch step is always correct
        _failed = True
        warnings.warn(f"segcal: fused metric kernel unavailable ({type(err).__name__}); using the PyTorch path",
                      RuntimeWarning, stacklevel=3)
        return None
    return _module


def enabled() -> bool:
    """``SEGCAL_FUSED=1`` in the environment (read at each call, so tests and benchmarks can switch it)."""
    return os.environ.get("SEGCAL_FUSED", "0") == "1"


def available() -> bool:
    """Whether the fused kernel is (or can be) built here (builds it on the first call)."""
    return _load() is not None


def dense_stats(p: Tensor, y: Tensor, weight: Tensor | None, n: int) -> tuple[Tensor, ...] | None:
    """Fused twin of the dense chunk step: ``(conf, pred, p_y, rows)`` with ``rows`` the classwise row histogram
    of ``p * weight`` (``weight=None``: no classwise rows, an empty tensor). ``None`` when it does not apply here.

    ``conf`` (max), ``pred`` (first argmax) and ``p_y`` (gather) are exact operations, and the rows repeat the
    PyTorch step's float32 products and per-row addition order, so every result is bit-identical to it.
    """
    if p.device.type != "cpu" or p.dtype != torch.float32 or not enabled():
        return None
    mod = _load()
    if mod is None:
        return None
    w = weight.contiguous() if weight is not None else p.new_zeros(p.shape[0], p.shape[2], p.shape[3])
    return mod.dense_stats(p.contiguous(), y.contiguous(), w, int(n), weight is not None)
