"""Fixtures for model tests: the published weights and a few CamVid frames (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The machine is shared; one thread keeps timings predictable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def segcal_data() -> Path:
    root = os.environ.get("SEGCAL_DATA")
    if not root or not (Path(root) / "espnet_pretrained").is_dir() or not (Path(root) / "camvid").is_dir():
        pytest.skip("needs SEGCAL_DATA with camvid/ and espnet_pretrained/")
    return Path(root)


@pytest.fixture(scope="session")
def espnet_camvid(segcal_data):
    from segcal.models import load

    return load("espnet-camvid")


@pytest.fixture(scope="session")
def espnet_cityscapes(segcal_data):
    from segcal.models import load

    return load("espnet-cityscapes")
