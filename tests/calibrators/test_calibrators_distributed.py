"""Distributed fitting: two gloo processes, each on its shard, end with the single-process parameters."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcal.calibrators import EnsembleTemperatureScaling, HistogramBinning, TemperatureScaling, VectorScaling


def _data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 16, 16, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / 1.5, 1).permute(0, 2, 3, 1).reshape(-1, 3), 1, generator=g)
    y = y.view(4, 16, 16)
    y[:, 0] = 255
    return z, y


def _fit_all(z, y):
    vs = VectorScaling(max_iter=20).fit(z, y)
    return {
        "ts": TemperatureScaling().fit(z, y).temperature_,
        "vs": torch.cat([vs.weight_, vs.bias_]).tolist(),
        "ets": EnsembleTemperatureScaling(max_iter=20).fit(z, y).weights_.tolist(),
        "hb": HistogramBinning().fit(z, y).table_.sum().item(),
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    z, y = _data()
    shard = slice(2 * rank, 2 * rank + 2)
    res = _fit_all(z[shard], y[shard])
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)")
def test_two_process_fit_matches_single_process(tmp_path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, init, out), nprocs=2, join=True)
    z, y = _data()
    ref = _fit_all(z, y)
    for rank in range(2):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        assert res["ts"] == pytest.approx(ref["ts"], rel=1e-4)
        assert res["vs"] == pytest.approx(ref["vs"], abs=2e-3)
        assert res["ets"] == pytest.approx(ref["ets"], abs=2e-3)
        assert res["hb"] == pytest.approx(ref["hb"], rel=1e-6)
