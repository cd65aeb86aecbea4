"""engine.train / Trainer: learning, exact resume, determinism, loss hooks, logs."""

from __future__ import annotations

import json

import pytest
import torch
from engine_toys import ToyDataset, ToySegmenter

from segcal.engine import TrainConfig, Trainer, cross_entropy, evaluate_model, train

FAST = {"epochs": 3, "batch_size": 4, "lr": 0.02, "progress": False}


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_and_val_metrics_logged(tmp_path):
    model, data, val = ToySegmenter(), ToyDataset(n=12, sizes=((12, 16), (16, 12))), ToyDataset(n=4, seed=9)
    before = evaluate_model(model, val)
    hist = train(model, data, val, out_dir=tmp_path, **{**FAST, "epochs": 4})
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert hist[-1]["val_accuracy"] > before["accuracy"] + 0.1
    assert {"val_miou", "val_ece", "val_nll", "step_time_mean", "lr"} <= set(hist[-1])
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4] and lines == hist
    assert hist[-1]["lr"] < 0.02 * 0.5  # poly decay reached the end of the schedule


def test_deterministic_given_seed():
    kw = {**FAST, "epochs": 2, "crop_size": (8, 8), "hflip": True, "seed": 3}
    a, b, c = ToySegmenter(), ToySegmenter(), ToySegmenter()
    train(a, ToyDataset(n=8), **kw)
    train(b, ToyDataset(n=8), **kw)
    train(c, ToyDataset(n=8), **{**kw, "seed": 4})
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), _weights(c))


class Crash(RuntimeError):
    pass


def test_resume_after_kill_gives_identical_weights(tmp_path):
    kw = {**FAST, "crop_size": (8, 12), "hflip": True, "optimizer": "sgd"}
    ref = ToySegmenter()
    ref_hist = train(ref, ToyDataset(n=8), **kw)

    calls = {"n": 0}

    def dying_loss(logits, target):
        calls["n"] += 1
        if calls["n"] == 5:  # second step of epoch 3 (2 steps per epoch)
            raise Crash
        return cross_entropy(logits, target)

    with pytest.raises(Crash):
        train(ToySegmenter(), ToyDataset(n=8), loss=dying_loss, out_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        train(ToySegmenter(), ToyDataset(n=8), out_dir=tmp_path, resume=True, **{**kw, "batch_size": 2})
    resumed = ToySegmenter()
    with torch.no_grad():  # perturbed: the trained weights must all come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    resumed.load_state_dict(ToySegmenter().state_dict())
    hist = train(resumed, ToyDataset(n=8), loss=dying_loss, out_dir=tmp_path, resume=True, **kw)
    assert _same(_weights(resumed), _weights(ref))
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in ref_hist]


class HookLoss(torch.nn.Module):
    """ASLP-like: needs ids, gets the holdout accuracy each epoch, keeps per-image state in its state_dict."""

    needs_ids = True

    def __init__(self):
        super().__init__()
        self.seen: dict[str, int] = {}
        self.epochs: list[tuple[int, float]] = []

    def on_epoch_start(self, epoch, val_accuracy=None):
        self.epochs.append((epoch, val_accuracy))

    def forward(self, logits, target, ids):
        for i in ids:
            self.seen[i] = self.seen.get(i, 0) + 1
        return cross_entropy(logits, target)

    def get_extra_state(self):
        return {"seen": dict(self.seen)}

    def set_extra_state(self, state):
        self.seen = dict(state["seen"])


def test_loss_hooks_ids_holdout_and_state(tmp_path):
    data = ToyDataset(n=20)
    loss = HookLoss()
    trainer = Trainer(ToySegmenter(), loss, data, out_dir=tmp_path, holdout_fraction=0.1,
                      **{**FAST, "epochs": 2})
    trainer.fit()
    held = {data.names[i] for i in trainer.holdout_indices}
    assert len(held) == 2 and not held & set(loss.seen)  # held-out images never train
    assert set(loss.seen) == set(data.names) - held and all(v == 2 for v in loss.seen.values())
    assert [e for e, _ in loss.epochs] == [0, 1] and all(0 <= a <= 1 for _, a in loss.epochs)
    loss2 = HookLoss()
    Trainer(ToySegmenter(), loss2, data, out_dir=tmp_path, holdout_fraction=0.1,
            **{**FAST, "epochs": 2}).fit(resume=True)
    assert loss2.seen == loss.seen  # restored from the checkpoint, no further steps


def test_short_protocol_options():
    hist = train(ToySegmenter(), ToyDataset(n=12), **{**FAST, "epochs": 1, "max_steps_per_epoch": 2})
    assert hist[0]["steps"] == 2
    t = Trainer(ToySegmenter(), None, ToyDataset(n=12), subset=5, progress=False)
    assert len(t.train_indices) == 5 and t.holdout_indices == []


def test_bad_config_and_data():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs").validate()
    with pytest.raises(ValueError, match="crop_size"):
        Trainer(ToySegmenter(), None, ToyDataset(), crop_size=(0, 3))
    with pytest.raises(ValueError, match="no labels"):
        train(ToySegmenter(), ToyDataset(labelled=False), epochs=1, progress=False)
    with pytest.raises(TypeError, match="Segmenter"):
        Trainer(torch.nn.Conv2d(3, 3, 1), None, ToyDataset())

    def nan_loss(logits, target):
        return logits.sum() * float("nan")

    with pytest.raises(FloatingPointError, match="images"):
        train(ToySegmenter(), ToyDataset(n=2), loss=nan_loss, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"^loss is nan at epoch 1, step 1 \(global step 1, images") as err:
        train(ToySegmenter(), ToyDataset(n=2), loss=nan_loss, epochs=1, progress=False)
    assert "\n" not in str(err.value)


# -- resume identity (issue 12 item 7) ----------------------------------------------------------------------------
class ScaledCE(torch.nn.Module):
    def __init__(self, scale: float = 1.0, ignore_index: int | None = 255) -> None:
        super().__init__()
        self.scale, self.ignore_index = scale, ignore_index

    def forward(self, logits, target):
        return cross_entropy(logits, target, self.ignore_index) * self.scale


def _one_epoch(tmp_path, **kw):
    args = {"epochs": 1, "batch_size": 4, "lr": 0.02, "progress": False, "out_dir": tmp_path, **kw}
    return train(args.pop("model", ToySegmenter()), args.pop("data", ToyDataset(n=8)), **args)


def test_resume_refuses_every_changed_setting_in_one_line(tmp_path):
    _one_epoch(tmp_path, loss=ScaledCE(1.0), crop_size=(8, 8))
    changes = {"lr": {"lr": 0.01}, "crop_size": {"crop_size": (6, 8)}, "seed": {"seed": 3},
               "loss.scale": {"loss": ScaledCE(2.0)}, "loss.class": {"loss": None},
               "model.weights": {"model": ToySegmenter(seed=5)}, "model.num_classes": {"model": ToySegmenter(4)},
               "train_data.len": {"data": ToyDataset(n=9)}, "epochs": {"epochs": 2}}
    for key, change in changes.items():
        kw = {"loss": ScaledCE(1.0), "crop_size": (8, 8), **change}
        with pytest.raises(ValueError, match="different settings") as err:
            _one_epoch(tmp_path, resume=True, **kw)
        msg = str(err.value)
        assert key in msg and "\n" not in msg, msg
    # lr and loss changed together: both listed
    with pytest.raises(ValueError) as err:
        _one_epoch(tmp_path, resume=True, loss=ScaledCE(3.0), crop_size=(8, 8), lr=0.5)
    assert "lr 0.02 -> now 0.5" in str(err.value) and "loss.scale 1.0 -> now 3.0" in str(err.value)
    hist = _one_epoch(tmp_path, resume=True, loss=ScaledCE(1.0), crop_size=(8, 8), val_subset=2)  # report-only
    assert len(hist) == 1


def test_no_resume_starts_over_and_keeps_the_old_run(tmp_path):
    first = _one_epoch(tmp_path)
    with pytest.warns(UserWarning, match="previous-1"):
        second = _one_epoch(tmp_path, resume=False, lr=0.05)  # other settings: a fresh run, not a refusal
    assert (tmp_path / "previous-1" / "last.pt").is_file() and (tmp_path / "previous-1" / "log.jsonl").is_file()
    assert second[0]["train_loss"] != first[0]["train_loss"]
    with pytest.warns(UserWarning, match="previous-2"):
        _one_epoch(tmp_path, resume=False)


def test_resume_model_mismatch_and_bad_checkpoint_are_one_line_errors(tmp_path):
    _one_epoch(tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("cls")}
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="weights of another model") as err:
        _one_epoch(tmp_path, resume=True)
    assert "\n" not in str(err.value)
    (tmp_path / "last.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint") as err:
        _one_epoch(tmp_path, resume=True)
    assert "\n" not in str(err.value)


class VoidZeroData(ToyDataset):
    """Labels 1..C-1 plus void = 0: the ignored label must come from the data, not a literal 255."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.ignore_index = 0


def test_ignore_index_comes_from_the_training_data():
    t = Trainer(ToySegmenter(), None, VoidZeroData(n=4), progress=False, epochs=1)
    assert t.config.ignore_index == 0
    logits, target = torch.randn(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 0]]])
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=0)
    torch.testing.assert_close(t.loss(logits, target), ref)
    assert Trainer(ToySegmenter(), None, ToyDataset(n=4), progress=False).config.ignore_index == 255
    with pytest.raises(ValueError, match="ignore_index=0"):
        Trainer(ToySegmenter(), ScaledCE(1.0, ignore_index=255), VoidZeroData(n=4), progress=False)
