"""Optional fused CPU kernel for the classwise-ECE row histograms (the costliest step of ``CalibrationMetrics.update``).

The pure-PyTorch step (``calibration._classwise_rows``) multiplies the probabilities by ``n`` (0 on invalid pixels),
takes the slot ``ceil(n p)`` and adds ``n p`` into a per-row float32 histogram with ``index_add_`` (a serial loop in
element order). This kernel does the same IEEE float32 operations in the same order inside each row, in one read of
the probabilities and with rows spread over torch's intra-op threads (``at::parallel_for``), so its result is
**bit-identical** to the fallback (tested) and it uses every thread torch is allowed.

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
#include <vector>

// p: (N, C, H, W) float32 contiguous; weight: (N, H, W) float32 contiguous (n on valid pixels, 0 elsewhere).
// out: (N, C, H, n + 1) float32, out[i, c, h, s] = sum over w (in order) of p*weight where ceil(p*weight) == s.
torch::Tensor classwise_rows(torch::Tensor p, torch::Tensor weight, int64_t n) {
  TORCH_CHECK(p.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "float32 expected");
  TORCH_CHECK(p.is_contiguous() && weight.is_contiguous(), "contiguous tensors expected");
  const int64_t N = p.size(0), C = p.size(1), H = p.size(2), W = p.size(3), S = n + 1;
  auto out = torch::zeros({N, C, H, S}, p.options());
  const float* pp = p.data_ptr<float>();
  const float* ww = weight.data_ptr<float>();
  float* oo = out.data_ptr<float>();
  at::parallel_for(0, N * C * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / (C * H), h = r % H;
      const float* prow = pp + r * W;
      const float* wrow = ww + (i * H + h) * W;
      float* acc = oo + r * S;
      for (int64_t w = 0; w < W; ++w) {
        const float v = prow[w] * wrow[w];
        const int64_t s = static_cast<int64_t>(std::ceil(v));
        acc[s] += v;
      }
    }
  });
  return out;
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

        folder = Path(os.environ.get("SEGCAL_EXT_DIR", Path.home() / ".cache" / "segcal" / "ext")) / "fused_v1"
        folder.mkdir(parents=True, exist_ok=True)
        _module = load_inline(name="segcal_fused_v1", cpp_sources=[_SOURCE], functions=["classwise_rows"],
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


def classwise_rows(p: Tensor, weight: Tensor, n: int) -> Tensor | None:
    """Fused twin of ``calibration._classwise_rows(p * weight, n)``; ``None`` when it does not apply here."""
    if p.device.type != "cpu" or p.dtype != torch.float32 or not enabled():
        return None
    mod = _load()
    if mod is None:
        return None
    return mod.classwise_rows(p.contiguous(), weight.contiguous(), int(n))
