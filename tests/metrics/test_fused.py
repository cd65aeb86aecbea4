"""Issue 14 item 1: the fused CPU kernels equal their PyTorch twins bit for bit, for any number of threads."""

import math
import os

import numpy as np
import pytest
import torch

from segcal.metrics import CalibrationMetrics, _fused
from segcal.metrics._binning import ace_fine_edges, ace_fine_index

from ._reference import realistic_logits


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("SEGCAL_FUSED", "1")
    if not _fused.available():
        pytest.skip("no C++ compiler for the fused kernels")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _states(monkeypatch, flag, batches, **kwargs):
    monkeypatch.setenv("SEGCAL_FUSED", flag)
    m = CalibrationMetrics(batches[0][0].shape[1], **kwargs)
    for preds, target in batches:
        m.update(preds, target)
    return {k: v.clone() for k, v in m.metric_state.items()}


@pytest.mark.parametrize("kwargs", [{}, {"boundary_width": 1, "exclude_classes": [1]}, {"input": "probs"},
                                    {"classwise": False}, {"n_bins": 7, "ace_resolution": 100}, {"n_bins": 2}])
def test_states_are_bit_identical_to_the_twins_for_any_thread_count(fused, monkeypatch, threads, kwargs):
    logits, target = realistic_logits(3, 6, 40, 53, seed=0)  # W = 53: not a multiple of any vector width
    target[:, :3] = 255
    preds = torch.softmax(logits, 1) if kwargs.get("input") == "probs" else logits
    batches = [(preds[:2], target[:2]), (preds[2:], target[2:])]
    want = _states(monkeypatch, "0", batches, **kwargs)
    for n_threads in (1, 2, 3):
        torch.set_num_threads(n_threads)
        got = _states(monkeypatch, "1", batches, **kwargs)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (n_threads, k)


def _hard_logits(c: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 9, 37, generator=g) * 6
    x[0, :, 0, :5] = 1.5  # exact ties: the first class wins, p = 1/C
    x[0, 0, 1, :] = 200.0  # gaps beyond exp's range: p exactly 0 and 1
    x[1, :, 2, :] = -3e4  # huge magnitudes, the NLL through log-sum-exp
    x[1, 1, 2, :7] = 3e4
    y = torch.randint(0, c, (2, 9, 37), generator=g)
    valid = torch.rand(2, 9, 37, generator=g) > 0.2
    return x, torch.where(valid, y, 0), valid


@pytest.mark.parametrize("c", [2, 5, 300])
@pytest.mark.parametrize("logits", [True, False])
@pytest.mark.parametrize("n", [1, 15])
def test_each_kernel_equals_its_twin(fused, threads, c, logits, n):
    x, y, valid = _hard_logits(c)
    if not logits:
        x = _fused.softmax(x)
    want = _fused._dense_rows_torch(x, logits, y, valid, n, True)
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        got = _fused._dense_rows_fused(x, logits, y, valid, n, True)
        for name, a, b in zip(("conf", "pred", "p_y", "cw", "brier", "nll_rows"), got, want):
            assert torch.equal(a, b), (n_threads, name)
    conf, pred, p_y = want[:3]
    region = (torch.arange(37) % 2).expand(2, 9, 37).contiguous()
    for reg in (None, region):
        want_h = _fused._pixel_hist_torch(conf, pred, p_y, y, valid, reg, n, 2, c, 4096, True)
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            got_h = _fused._pixel_hist_fused(conf, pred, p_y, y, valid, reg, n, 2, c, 4096, True)
            for a, b in zip(got_h, want_h):
                assert torch.equal(a, b), n_threads


def _edge_probabilities() -> torch.Tensor:
    """(1, 4, 3, 29) values in [0, 1] at the classwise kernel's boundaries: slot edges k / n and their float32
    neighbours, the vectorised pass's limit 1/2, halves of a unit (2**-33: rounding ties) and subnormals."""
    def near(v: float) -> list[float]:
        f = torch.tensor(v, dtype=torch.float32)
        return [float(torch.nextafter(f, torch.tensor(0.0))), float(f), float(torch.nextafter(f, torch.tensor(1.0)))]

    vals = [0.0, -0.0, 1e-45, 2**-33, 3 * 2**-33, 5 * 2**-34, 2**-23 + 2**-33, 1.0]
    for v in (1 / 15, 2 / 15, 1 / 7, 1 / 3, 0.5, 2 / 3, 14 / 15):
        vals += near(v)
    g = torch.Generator().manual_seed(5)
    pool = torch.tensor(vals, dtype=torch.float32)
    return pool[torch.randint(0, len(vals), (1, 4, 3, 29), generator=g)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 15])
def test_classwise_kernel_equals_its_twin_at_slot_edges(fused, n):
    x = _edge_probabilities()
    y = torch.zeros(1, 3, 29, dtype=torch.int32)
    valid = torch.ones(1, 3, 29, dtype=torch.bool)
    valid[0, 1, ::3] = False
    want = _fused._dense_rows_torch(x, False, y, valid, n, True)[3]
    got = _fused._dense_rows_fused(x, False, y, valid, n, True)[3]
    assert torch.equal(got, want)


def test_exact_ties_and_saturation_are_handled(fused):
    x, y, valid = _hard_logits(5)
    conf, pred, *_ = _fused.dense_rows(x, True, y, valid, 15, True)
    assert torch.all(pred[0, 0, :5] == 0) and torch.allclose(conf[0, 0, :5], torch.tensor(0.2))
    assert torch.all(conf[0, 1] == 1.0) and torch.all(pred[0, 1] == 0)


def test_softmax_twin_is_within_a_few_ulp_of_the_true_softmax():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(4, 7, 16, 16, generator=g) * s for s in (0.1, 3.0, 30.0)])
    d = (x - x.amax(1, keepdim=True)).double()  # rounded in float32 by both, as by torch.softmax
    ref = torch.softmax(d, 1)
    got = _fused.softmax(x).double()
    rel = ((got - ref).abs() / ref.clamp_min(1e-30))[ref > 1e-30]
    assert float(rel.max()) < 1e-6  # float32: ~8 ulp at most after exp, sum and division
    assert float((got - torch.softmax(x, 1).double()).abs().max()) < 1e-6
    assert torch.allclose(got.sum(1), torch.ones(1, dtype=torch.float64), atol=1e-6)


def test_log_twin_matches_math_log():
    v = torch.cat([torch.logspace(-37.9, 38, 20001), torch.tensor([1.0, 2.0, 0.5, math.sqrt(0.5)])]).float()
    ref = torch.tensor([math.log(float(t)) for t in v], dtype=torch.float64)
    got = _fused.log_twin(v).double()
    assert float((got - ref).abs().max()) <= 2 * float(torch.finfo(torch.float32).eps) * 88
    assert float(_fused.log_twin(torch.tensor([1.0]))) == 0.0


def test_nll_is_exact_for_underflowing_probabilities(fused):
    x = torch.zeros(1, 3, 1, 4)
    x[0, 0] = torch.tensor([0.0, 200.0, 1e4, -50.0])
    y = torch.tensor([[[0, 1, 2, 0]]])
    m = CalibrationMetrics(3, ignore_index=None)
    m.update(x, y)
    ref = float((torch.logsumexp(x.double(), 1) - x.double().gather(1, y.unsqueeze(1)).squeeze(1)).mean())
    assert float(m.compute()["nll"]) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_kernel_refuses_non_finite_logits(fused, bad):
    x = torch.zeros(1, 3, 4, 4)
    x[0, 1, 2, 2] = float(bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        CalibrationMetrics(3).update(x, torch.zeros(1, 4, 4, dtype=torch.long))


def test_kernel_never_reads_out_of_range_without_validation(fused):
    m = CalibrationMetrics(3, validate_args=False)
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    y[0, 0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.zeros(1, 3, 4, 4), y)
    assert int(m.bin_count.sum()) == 0  # nothing committed


def test_fine_index_and_edges_agree():
    g = torch.Generator().manual_seed(3)
    c = torch.cat([torch.rand(50000, generator=g) ** 0.1, torch.tensor([0.0, 0.5, 1 - 2**-24, 1.0])])
    for res in (16, 1000, 2**16):
        idx = ace_fine_index(c, res).long()
        edges = ace_fine_edges(res)
        assert torch.all(edges[:-1] <= edges[1:])
        assert torch.all(edges[idx] <= c.double())
        assert torch.all((c.double() < edges[idx + 1]) | (idx >= res - 2))
        assert int(idx[-1]) == res - 1 and int(idx[-4]) == 0


def test_without_a_compiler_the_twins_are_used_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_fused, "_lib", None)
    monkeypatch.setattr(_fused, "_failed", False)
    monkeypatch.setenv("SEGCAL_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SEGCAL_FUSED", "1")
    logits, target = realistic_logits(1, 4, 8, 8)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        m = CalibrationMetrics(4)
        m.update(logits, target)
    assert not _fused.available()
    monkeypatch.setenv("SEGCAL_FUSED", "0")
    ref = CalibrationMetrics(4)
    ref.update(logits, target)
    for k, v in ref.metric_state.items():
        assert torch.equal(getattr(m, k), v), k


def test_a_kernel_built_without_openmp_or_native_flags_gives_the_same_states(fused, monkeypatch, tmp_path):
    logits, target = realistic_logits(2, 5, 24, 31, seed=4)
    target[:, :2] = 255
    want = _states(monkeypatch, "0", [(logits, target)])
    monkeypatch.setattr(_fused, "_lib", None)
    monkeypatch.setattr(_fused, "_OPTIONAL_FLAGS", ([],))  # plain -O3: no -fopenmp, no -march=native
    monkeypatch.setenv("SEGCAL_EXT_DIR", str(tmp_path))
    got = _states(monkeypatch, "1", [(logits, target)])
    assert list(tmp_path.glob("segcal_fused_*.so"))
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x, y, valid = _edge_probabilities(), torch.zeros(1, 3, 29, dtype=torch.int32), torch.ones(1, 3, 29, dtype=bool)
    for n in (1, 2, 15):  # the classwise pass without AVX2
        assert torch.equal(_fused._dense_rows_fused(x, False, y, valid, n, True)[3],
                           _fused._dense_rows_torch(x, False, y, valid, n, True)[3])


def test_kernels_are_built_once_into_the_cache(fused):
    folder = os.environ.get("SEGCAL_EXT_DIR")
    assert _fused._lib is not None
    libs = [p for p in _fused.Path(folder or _fused.Path.home() / ".cache/segcal/ext").glob("segcal_fused_*.so")]
    assert libs
    assert np.all([p.stat().st_size > 0 for p in libs])
