"""Two CPU processes (gloo) must give exactly the one-process result: every state is an int64 sum."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcal.metrics import CalibrationMetrics, DetectionMetrics

from ._reference import realistic_logits


def _data():
    logits, target = realistic_logits(4, 5, 16, 20, seed=0)
    target[:, :2] = 255
    scores = 1.0 - torch.softmax(logits, 1).amax(1)
    return logits, target, scores, logits.argmax(1) != target


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, target, scores, positive = _data()
        cal = CalibrationMetrics(5, boundary_width=1)
        det = DetectionMetrics(per_image=True)
        exact = DetectionMetrics(exact=True)
        for i in range(rank, 4, world):  # rank 0: images 0, 2; rank 1: images 1, 3
            cal.update(logits[i:i + 1], target[i:i + 1])
            det.update(scores[i:i + 1], positive[i:i + 1], target[i:i + 1] != 255)
            exact.update(scores[i:i + 1], positive[i:i + 1], target[i:i + 1] != 255)
        res = {"cal": cal.compute(), "det": det.compute(), "exact": exact.compute(), "rel": cal.reliability(),
               "curves": det.curves()}
        if rank == 0:
            torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


def _single():
    logits, target, scores, positive = _data()
    cal = CalibrationMetrics(5, boundary_width=1)
    det = DetectionMetrics(per_image=True)
    exact = DetectionMetrics(exact=True)
    for i in range(4):
        cal.update(logits[i:i + 1], target[i:i + 1])
        det.update(scores[i:i + 1], positive[i:i + 1], target[i:i + 1] != 255)
        exact.update(scores[i:i + 1], positive[i:i + 1], target[i:i + 1] != 255)
    return {"cal": cal.compute(), "det": det.compute(), "exact": exact.compute(), "rel": cal.reliability(),
            "curves": det.curves()}, (cal, det)


def _assert_identical(a, b):
    for group in a:
        for k, v in a[group].items():
            w = b[group][k]
            assert v.shape == w.shape and torch.allclose(v, w, rtol=0.0, atol=0.0, equal_nan=True), (group, k, v, w)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_gloo_processes_equal_one_process_exactly(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    _assert_identical(_single()[0], torch.load(out))


def test_merge_state_equals_one_pass():
    logits, target, scores, positive = _data()
    ref, _ = _single()
    parts = []
    for r in range(2):
        cal, det = CalibrationMetrics(5, boundary_width=1), DetectionMetrics(per_image=True)
        for i in range(r, 4, 2):
            cal.update(logits[i:i + 1], target[i:i + 1])
            det.update(scores[i:i + 1], positive[i:i + 1], target[i:i + 1] != 255)
        parts.append((cal, det))
    parts[0][0].merge_state(parts[1][0])
    parts[0][1].merge_state(parts[1][1])
    _assert_identical({"cal": ref["cal"], "det": ref["det"]},
                      {"cal": parts[0][0].compute(), "det": parts[0][1].compute()})
