"""Suite-wide settings: hypothesis profile, the `realdata` gate and the `device` fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "segcal", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "segcal"))


def data_root() -> Path | None:
    root = os.environ.get("SEGCAL_DATA")
    if not root:
        return None
    path = Path(root)
    return path if path.is_dir() else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = data_root()
    have_camvid = root is not None and (root / "camvid").is_dir()
    have_weights = root is not None and (root / "espnet_pretrained").is_dir()
    skip = pytest.mark.skip(reason="needs SEGCAL_DATA with camvid/ and espnet_pretrained/")
    for item in items:
        if "realdata" in item.keywords and not (have_camvid and have_weights):
            item.add_marker(skip)


def _device_params() -> list[object]:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture(params=_device_params())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device the suite can exercise: ``cpu`` always, ``cuda`` when available (skipped otherwise)."""
    return torch.device(request.param)
