import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcal.metrics import boundary_mask

from ._reference import boundary_reference


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_matches_brute_force(n, h, w, seed, k):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = 255
    got = boundary_mask(target, k)
    assert np.array_equal(got.numpy(), boundary_reference(target.numpy(), k))


def test_ignore_does_not_create_boundary_and_border_is_not_boundary():
    y = torch.tensor([[[0, 0, 255, 255, 0, 0]]])
    assert boundary_mask(y, 1).sum() == 0
    y = torch.tensor([[[0, 0, 0, 1, 1, 1]]])
    assert boundary_mask(y, 2).int().tolist() == [[[0, 1, 1, 1, 1, 0]]]


def test_bad_width():
    with pytest.raises(ValueError, match="width"):
        boundary_mask(torch.zeros(1, 2, 2, dtype=torch.long), 0)


@pytest.mark.realdata
def test_camvid_band_matches_brute_force(camvid_labels):
    y = camvid_labels[:1, 100:160, 200:280]
    assert np.array_equal(boundary_mask(y, 2).numpy(), boundary_reference(y.numpy(), 2))
