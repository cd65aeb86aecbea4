"""Issue 14 item 1: the fused classwise kernel gives states bit-identical to the pure-PyTorch fallback."""

import pytest
import torch

from segcal.metrics import CalibrationMetrics, _fused

from ._reference import realistic_logits


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("SEGCAL_FUSED", "1")
    if not _fused.available():
        pytest.skip("no C++ toolchain for the fused kernel")


@pytest.mark.parametrize("kwargs", [{}, {"boundary_width": 1, "exclude_classes": [1]}, {"input": "probs"},
                                    {"classwise": False}, {"n_bins": 7}])
def test_fused_states_are_bit_identical_to_the_fallback(fused, monkeypatch, kwargs):
    logits, target = realistic_logits(3, 6, 40, 52, seed=0)
    target[:, :3] = 255
    preds = torch.softmax(logits, 1) if kwargs.get("input") == "probs" else logits
    states = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SEGCAL_FUSED", flag)
        m = CalibrationMetrics(6, **kwargs)
        m.update(preds[:2], target[:2])
        m.update(preds[2:], target[2:])
        states.append({k: v.clone() for k, v in m.metric_state.items()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_fused_kernel_matches_each_pytorch_step_under_threads(fused):
    from segcal.metrics.calibration import _classwise_rows, _first_argmax

    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 5, 33, 70, generator=g) * 5, 1)
    p[0, :, 0, :4] = 0.2  # exact ties: the first class wins
    y = torch.randint(0, 5, (2, 33, 70), generator=g)
    weight = torch.where(torch.rand(2, 33, 70, generator=g) > 0.2, 15.0, 0.0)
    conf = p.amax(1)
    want = (conf, _first_argmax(p, conf), p.gather(1, y.unsqueeze(1)).squeeze(1),
            _classwise_rows(p * weight.unsqueeze(1), 15))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = _fused.dense_stats(p, y, weight, 15)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)
