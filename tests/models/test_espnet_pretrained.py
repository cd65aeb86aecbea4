"""The published ESPNet weights: strict loading, preprocessing recipe, shapes, published accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.models import ESPNet, load
from segcal.models.pretrained import CAMVID_MEAN_BGR, CAMVID_STD_BGR, CITYSCAPES_TO_CAMVID, pretrained_path

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize("name, raw, skip", [("espnet-camvid", 12, "b1"), ("espnet-cityscapes", 20, "level1")])
def test_published_state_dict_loads_strictly(segcal_data, name, raw, skip):
    state = torch.load(pretrained_path(name), map_location="cpu", weights_only=True)
    assert len(state) == 189
    net = ESPNet(raw, skip=skip)
    net.load_state_dict(state, strict=True)
    # The 2018 files predate BatchNorm's num_batches_tracked buffer; every other key must match one to one.
    assert {k for k in net.state_dict() if not k.endswith("num_batches_tracked")} == set(state)
    torch.testing.assert_close(net.state_dict()["classifier.weight"], state["classifier.weight"])
    # The other wiring must not fit: the skip width is what tells the two files apart.
    with pytest.raises(RuntimeError):
        ESPNet(raw, skip="level1" if skip == "b1" else "b1").load_state_dict(state, strict=True)


def test_segmenter_attributes(espnet_camvid, espnet_cityscapes):
    from segcal.data import CAMVID_CLASSES

    for m in (espnet_camvid, espnet_cityscapes):
        assert m.num_classes == 11 and m.class_names == list(CAMVID_CLASSES)
        assert not m.training
    assert espnet_camvid.name == "espnet-camvid" and espnet_camvid.feature_channels == 12
    assert espnet_cityscapes.feature_channels == 20


def test_preprocess_matches_readme_recipe(espnet_camvid):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 8, 16, 3), dtype=np.uint8)
    bgr = img[..., ::-1].astype(np.float64)
    expected = ((bgr - np.array(CAMVID_MEAN_BGR)) / np.array(CAMVID_STD_BGR) / 255.0).transpose(0, 3, 1, 2)
    got = espnet_camvid.preprocess(img)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 8, 16)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)
    # single image and torch input give the same batch of one
    assert torch.equal(espnet_camvid.preprocess(torch.from_numpy(img[0])), got[:1])


def test_camvid_logits_are_raw_channels_0_to_10(espnet_camvid):
    img = np.random.default_rng(1).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    raw = espnet_camvid.net(espnet_camvid.preprocess(img))
    torch.testing.assert_close(espnet_camvid.predict_logits(img), raw[0, :11].detach())


def test_cityscapes_head_merges_probabilities(espnet_cityscapes):
    img = np.random.default_rng(2).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    raw = espnet_cityscapes.net(espnet_cityscapes.preprocess(img))[0].detach()
    p = torch.softmax(raw[:19], 0)
    expected = torch.stack([p[list(g)].sum(0) for g in CITYSCAPES_TO_CAMVID.values()])
    got = espnet_cityscapes.predict_logits(img)
    torch.testing.assert_close(got.exp(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.exp().sum(0), torch.ones(48, 64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(357, 479), (33, 41), (8, 8), (5, 3)])
def test_predict_logits_at_odd_sizes(espnet_camvid, hw):
    img = np.random.default_rng(3).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    out = espnet_camvid.predict_logits(img)
    assert out.shape == (11, *hw) and torch.isfinite(out).all()
    logits, feats = espnet_camvid.predict_batch(img[None], features=True)
    assert logits.shape == (1, 11, *hw)
    assert feats.shape == (1, 12, -(-hw[0] // 2), -(-hw[1] // 2))


def test_cropping_a_padded_size_agrees_in_the_interior(espnet_camvid):
    # 360x480 needs no padding; a 357x479 crop is padded by reflection. Far from the padded border the
    # predictions must agree with the un-padded run (the receptive field does not reach the pad).
    img = np.random.default_rng(4).integers(0, 256, size=(360, 480, 3), dtype=np.uint8)
    full = espnet_camvid.predict_logits(img).argmax(0)
    crop = espnet_camvid.predict_logits(img[:357, :479]).argmax(0)
    agree = (full[:200, :300] == crop[:200, :300]).float().mean()
    assert agree > 0.99


def test_forward_is_differentiable_and_keeps_train_mode(segcal_data):
    m = load("espnet-camvid")  # own copy: a train-mode forward updates BatchNorm statistics
    x = m.preprocess(np.zeros((1, 20, 28, 3), dtype=np.uint8)).requires_grad_(True)
    m.train()
    m(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert m.net.classifier.weight.grad is not None
    m.predict_logits(np.zeros((16, 16, 3), dtype=np.uint8))
    assert m.training  # predict_* restores the caller's mode


def test_load_raw_state_dict_path(segcal_data, espnet_camvid):
    m = load(pretrained_path("espnet-camvid"))
    img = np.random.default_rng(5).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    torch.testing.assert_close(m.predict_logits(img), espnet_camvid.predict_logits(img))


def test_reproduces_published_accuracy_on_val_subset(espnet_camvid, segcal_data):
    """README: 93.3 % pixel accuracy on the 101 val frames; 8 evenly spaced frames must land near it."""
    from segcal.data import CamVid

    ds = CamVid(split="val")
    idx = np.linspace(0, len(ds) - 1, 8).round().astype(int)
    correct = total = 0
    nll = 0.0
    for i in idx:
        s = ds[int(i)]
        logits = espnet_camvid.predict_logits(s["image"])
        t = torch.from_numpy(s["target"])
        valid = t != 255
        correct += int((logits.argmax(0)[valid] == t[valid]).sum())
        total += int(valid.sum())
        nll += float(-torch.log_softmax(logits, 0).gather(0, t.clamp(max=10)[None])[0][valid].sum())
    acc = correct / total
    assert 0.90 < acc < 0.97, acc
    assert nll / total < 0.5


def test_subnormal_weights_are_flushed_without_changing_outputs(segcal_data, espnet_cityscapes):
    state = torch.load(pretrained_path("espnet-cityscapes"), map_location="cpu", weights_only=True)
    raw = ESPNet(20, skip="level1").eval()
    raw.load_state_dict(state, strict=True)
    tiny = torch.finfo(torch.float32).tiny
    assert any(((v != 0) & (v.abs() < tiny)).any() for v in state.values() if v.is_floating_point())
    for v in espnet_cityscapes.net.state_dict().values():
        if v.is_floating_point():
            assert not ((v != 0) & (v.abs() < tiny)).any()
    x = espnet_cityscapes.preprocess(np.random.default_rng(6).integers(0, 256, size=(32, 48, 3), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(espnet_cityscapes.net(x), raw(x), atol=1e-5, rtol=1e-5)
