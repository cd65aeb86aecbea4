"""Two gloo processes, each fitting on its shard, reach the single-process threshold bit for bit."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcal.conformal import CoverageRiskControl, FNRControl

from ._synthetic import make_data


def _fit_all(z, y, batch_size):
    out = {}
    for name, ctrl in {"cov": CoverageRiskControl(alpha=0.1, epsilon=0.05, batch_size=batch_size),
                       "frac": CoverageRiskControl(alpha=0.1, loss="fraction", score="aps", batch_size=batch_size),
                       "fnr": FNRControl(alpha=0.1, class_index=2, batch_size=batch_size)}.items():
        ctrl.fit(z, y)
        out[name] = [ctrl.threshold_, ctrl.risk_bound_, ctrl.set_size_, float(ctrl.n_calibration_)]
    return out


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    z, y = make_data(60, seed=5)
    shard = slice(rank, None, world)  # interleaved images, as LogitsStore.shard_names gives them
    torch.save(_fit_all(z[shard], y[shard], batch_size=7), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # two interpreter start-ups dominate (~10-25 s on a busy machine)
@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)")
def test_two_process_fit_equals_single_process(tmp_path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, init, out), nprocs=2, join=True)
    z, y = make_data(60, seed=5)
    ref = _fit_all(z, y, batch_size=60)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}", weights_only=True) == ref  # exact: integer sums
