"""FlowEneDet and SML fit straight from a segcal.data.LogitsStore (the interface the CLI feeds them)."""

from __future__ import annotations

import pytest
import torch

from segcal.detectors import FlowEneDet, StandardizedMaxLogit, fit_sml_statistics

from ._synthetic import synthetic

data = pytest.importorskip("segcal.data")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    z, y, f = synthetic(6, 0)
    s = data.LogitsStore.create(tmp_path_factory.mktemp("store"), {"model": "toy", "dataset": "synthetic",
                                                                   "split": "train", "num_classes": 3,
                                                                   "features": True})
    for i in range(len(z)):
        s.write(f"im{i}", z[i], y[i], f[i])
    return data.LogitsStore(s.path) if hasattr(s, "path") else s, (z, y, f)


def test_fit_from_store_matches_fit_from_batches(store):
    s, (z, y, f) = store
    # the store keeps float16 logits: compare against the same rounding
    batches = [(z.half().float(), y, f.half().float())]
    torch.testing.assert_close(fit_sml_statistics(s).class_mean_, fit_sml_statistics(batches).class_mean_)
    assert StandardizedMaxLogit().fit(s).score(z).shape == y.shape
    a = FlowEneDet(variant="c", epochs=2, warmup_steps=1, seed=3).fit(s)
    assert a.feature_channels_ == 8 and a.n_steps_ >= 2
    assert a.score(z, f).shape == y.shape
