import torch
from sklearn.metrics import f1_score

from segcal.metrics.open_set import f1_optimal_threshold, open_set_miou


def test_f1_threshold_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, generator=g).round(decimals=1)  # ties included
    positive = torch.rand(300, generator=g) < torch.sigmoid(2 * scores)
    t = f1_optimal_threshold(scores, positive)
    best = max(f1_score(positive.numpy(), (scores >= u).numpy()) for u in scores.unique().tolist())
    assert abs(f1_score(positive.numpy(), (scores >= t).numpy()) - best) < 1e-12


def test_open_set_miou_by_hand():
    pred = torch.tensor([[[0, 0, 1, 1]]])
    target = torch.tensor([[[0, 0, 1, 255]]])
    ood = torch.tensor([[[False, False, True, False]]])
    unknown = torch.tensor([[[False, False, True, False]]])
    out = open_set_miou(pred, target, ood, unknown, num_classes=2)
    # open set: class 0 IoU 1, class 1 (no pixel left) skipped, unknown IoU 1
    assert out["open_set_miou"] == 1.0
    missed = open_set_miou(pred, target, ood, torch.zeros_like(unknown), num_classes=2)
    # the OOD pixel predicted as class 1: class 1 IoU 0 (union 1), unknown IoU 0 → mean of (1, 0, 0)
    assert abs(missed["open_set_miou"] - 1 / 3) < 1e-12
    assert out["closed_set_miou"] == 1.0
