"""FlowEneDet's coarse scoring path (``score_stride``): equal to its equations, shapes, and stride 1 = the full path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segcal.detectors import FlowEneDet
from segcal.detectors.flowenedet import box_pool, flow_input, low_res

from ._synthetic import as_batches, synthetic


@pytest.fixture(scope="module")
def fitted():
    batches = as_batches(*synthetic(8, 0), bs=2)
    det = FlowEneDet(variant="c", epochs=1, warmup_steps=1, n_blocks=2, seed=3).fit(batches)
    return det, synthetic(3, 1)


def _full_reference(det: FlowEneDet, z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The full-resolution path written out: the flow on every logit pixel, conditioners on the 1/downsample grid."""
    u = flow_input(z.float(), det.sml_)
    cond = F.interpolate(f.float(), size=low_res(z.shape[-2:], det.downsample), mode="bilinear",
                         align_corners=False)
    return torch.sigmoid(det.net_.error_logit(u, cond))


def test_stride_one_is_bit_identical_to_the_full_resolution_path(fitted):
    det, (z, _y, f) = fitted
    det.score_stride = 1
    torch.testing.assert_close(det.score(z, f), _full_reference(det, z, f), atol=0, rtol=0)
    det.score_stride = None


@pytest.mark.parametrize("stride", [2, 4])
def test_coarse_path_is_the_flow_on_pooled_logits_upsampled(fitted, stride):
    det, (z, _y, f) = fitted
    det.score_stride = stride
    h, w = z.shape[-2:]
    u = flow_input(F.avg_pool2d(z, stride), det.sml_)
    # the conditioners stay on the grid they were trained on: 1/downsample of the logits
    cond = F.interpolate(f, size=low_res((h, w), det.downsample), mode="bilinear", align_corners=False)
    coarse = torch.sigmoid(det.net_.error_logit(u, cond, max(1, det.downsample // stride)))
    want = F.interpolate(coarse[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(det.score(z, f), want, atol=1e-6, rtol=0)
    det.score_stride = None


def test_default_stride_is_the_conditioner_grid(fitted):
    det, (z, _y, f) = fitted
    assert det.score_stride is None
    default = det.score(z, f)
    det.score_stride = det.downsample
    torch.testing.assert_close(det.score(z, f), default, atol=0, rtol=0)
    det.score_stride = 1
    assert not torch.allclose(det.score(z, f), default)
    det.score_stride = None


def test_coarse_path_follows_the_full_path_on_blockwise_constant_logits(fitted):
    """Where the logits are constant over each 4×4 block the pooled input is exact; the two paths then differ only
    in where the bilinear upsampling happens (of the couplings' scale/shift maps, or of the final probability)."""
    det, (z, _y, f) = fitted
    zc = F.interpolate(z[..., ::4, ::4], scale_factor=4, mode="nearest")
    det.score_stride = 1
    full = det.score(zc, f)
    det.score_stride = 4
    coarse = det.score(zc, f)
    det.score_stride = None
    block = box_pool(coarse[:, None], 4) - box_pool(full[:, None], 4)
    assert block.abs().mean() < 0.1, block.abs().mean()
    assert torch.corrcoef(torch.stack([coarse.flatten(), full.flatten()]))[0, 1] > 0.8


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hw", [(15, 17), (16, 24), (5, 7)])
def test_scores_are_upsampled_to_the_logits_size(fitted, stride, hw):
    det, _ = fitted
    det.score_stride = stride
    z = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 3
    s = det.score(z, torch.randn(2, 8, -(-hw[0] // 2), -(-hw[1] // 2)))
    det.score_stride = None
    assert s.shape == (2, *hw) and s.dtype == torch.float32
    assert bool(((s >= 0) & (s <= 1)).all()) and bool(torch.isfinite(s).all())


@pytest.mark.parametrize("hw", [(16, 24), (15, 17), (4, 4)])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_box_pool_equals_adaptive_average_pooling(hw, factor):
    x = torch.randn(2, 5, *hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(box_pool(x, factor), F.adaptive_avg_pool2d(x, low_res(hw, factor)),
                               atol=1e-12, rtol=0)


def test_coarse_grids_nest_into_the_conditioner_grid():
    """low_res(low_res(H, r), d / r) == low_res(H, d): the conditioner of the coarse path sees the trained grid."""
    for d, r in ((4, 2), (4, 4), (8, 2), (8, 4)):
        for h in range(1, 70):
            assert low_res(low_res((h, h + 3), r), d // r) == low_res((h, h + 3), d)


def test_score_stride_is_validated_saved_and_defaulted_for_old_files(fitted, tmp_path):
    det, (z, _y, f) = fitted
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="score_stride"):
            FlowEneDet(score_stride=bad)
    det.score_stride = 2
    det.save(tmp_path / "fed.pt")
    loaded = FlowEneDet.load(tmp_path / "fed.pt")
    assert loaded.score_stride == 2
    torch.testing.assert_close(loaded.score(z, f), det.score(z, f), atol=0, rtol=0)
    det.score_stride = None
    shipped = type(FlowEneDet(variant="c")).pretrained("espnet-camvid")  # saved before score_stride existed
    assert shipped.score_stride == FlowEneDet().score_stride
