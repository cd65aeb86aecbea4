"""The optional, non-paper ``inputs="energy+msp"`` extension and the shipped espnet-camvid assets."""

import math

import pytest
import torch

from segcal.detectors import FlowEneDet, load_pretrained, load_pretrained_sml
from segcal.detectors.flowenedet import flow_input


def test_energy_msp_second_channel_is_log_max_softmax():
    import inspect

    if "inputs" not in inspect.signature(flow_input).parameters:
        pytest.skip("flow_input has no `inputs` option")
    z = torch.randn(2, 5, 4, 6)
    from segcal.detectors import SMLStatistics

    stats = SMLStatistics().fit([(z, z.argmax(1))])
    u = flow_input(z, stats, inputs="energy+msp")
    assert u.shape == (2, 2, 4, 6)
    assert torch.allclose(u[:, 1], torch.log_softmax(z, 1).amax(1), atol=1e-5)


def test_shipped_assets_load_and_score_in_unit_interval():
    u, c = load_pretrained("espnet-camvid", "u"), load_pretrained("espnet-camvid", "c")
    sml = load_pretrained_sml("espnet-camvid")
    z = torch.randn(1, 11, 24, 32) * 3
    s = u.score(z)
    assert s.shape == (1, 24, 32) and float(s.min()) >= 0.0 and float(s.max()) <= 1.0
    assert c.variant == "c" and isinstance(c, FlowEneDet)
    assert sml.class_mean_.shape == (11,) and math.isfinite(float(sml.class_std_.min()))
