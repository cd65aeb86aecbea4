"""Segmenter plumbing without real weights: adapters, padding/cropping, features, checkpoints, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segcal.models import (
    MergeClasses,
    Normalize,
    SelectChannels,
    build_espnet,
    load,
    load_checkpoint,
    save_checkpoint,
    wrap,
)


def _img(h=13, w=17, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


class _DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return {"out": self.body(x), "aux": torch.zeros(1)}


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _QuarterNet(nn.Module):
    """SegFormer-like: logits at 1/4 resolution in an object with `.logits`."""

    def __init__(self):
        super().__init__()
        self.decode = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        return _Out(self.decode(nn.functional.avg_pool2d(x, 4)))


def test_wrap_plain_tensor_module_matches_direct_call():
    net = nn.Conv2d(3, 5, 3, padding=1)
    seg = wrap(net)
    assert seg.num_classes == 5 and seg.class_names == [f"class_{i}" for i in range(5)]
    img = _img()
    x = Normalize.imagenet()(img)
    torch.testing.assert_close(seg.predict_logits(img), net(x)[0].detach())
    ref = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
    ref = ref / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(x[0], ref, atol=1e-5, rtol=1e-5)


def test_wrap_torchvision_dict_output():
    seg = wrap(_DictNet(), class_names=list("abcd"))
    out = seg.predict_batch(np.stack([_img(), _img(seed=1)]))
    assert out.shape == (2, 4, 13, 17)


def test_wrap_segformer_quarter_resolution_is_upsampled_bilinearly():
    net = _QuarterNet()
    seg = wrap(net, preprocess="none", size_divisor=4)
    img = _img(32, 48)
    got = seg.predict_logits(img)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    low = net(x).logits
    ref = nn.functional.interpolate(low, size=(32, 48), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(got, ref.detach())
    assert seg.predict_logits(_img(30, 45)).shape == (6, 30, 45)  # padded to 32x48, cropped back


def test_wrap_features_from_named_layer():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 3, 1))
    seg = wrap(net, feature_layer="1", feature_channels=8, size_divisor=2)
    logits, feats = seg.predict_batch(_img(9, 11)[None], features=True)
    assert logits.shape == (1, 3, 9, 11)
    assert feats.shape == (1, 8, 5, 6)
    assert (feats >= 0).all()  # the ReLU's output
    with pytest.raises(RuntimeError, match="feature"):
        wrap(nn.Conv2d(3, 2, 1)).predict_batch(_img()[None], features=True)
    with pytest.raises(AttributeError):
        wrap(nn.Conv2d(3, 2, 1), feature_layer="nope")


def test_padding_is_cropped_exactly():
    class Probe(nn.Module):
        def forward(self, x):
            self.seen = tuple(x.shape[-2:])
            return torch.cat([x[:, :1], -x[:, :1]], 1)

    probe = Probe()
    seg = wrap(probe, preprocess="none", num_classes=2, size_divisor=8)
    img = _img(13, 17)
    out = seg.predict_logits(img)
    assert probe.seen == (16, 24) and out.shape == (2, 13, 17)
    torch.testing.assert_close(out[0], torch.from_numpy(img[..., 0]).float())  # no shift, no resampling


def test_heads():
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(SelectChannels([0, 2])(x), x[:, [0, 2]])
    m = MergeClasses([[0, 3], [1]])  # channels 2 and 4 are dropped
    p = torch.softmax(x[:, [0, 1, 3]], 1)
    torch.testing.assert_close(m(x).exp(), torch.stack([p[:, 0] + p[:, 2], p[:, 1]], 1))
    with pytest.raises(ValueError, match="disjoint"):
        MergeClasses([[0, 1], [1]])


@pytest.mark.parametrize("bad, exc, match", [
    (np.zeros((8, 8, 3), np.float32), TypeError, "uint8"),
    (np.zeros((8, 8), np.uint8), ValueError, "3 RGB"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, "3 RGB"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
    ([[1, 2, 3]], TypeError, "numpy"),
    (torch.zeros(8, 8, 3), TypeError, "uint8"),
])
def test_bad_images_raise_clear_errors(bad, exc, match):
    seg = build_espnet()
    with pytest.raises(exc, match=match):
        seg.predict_logits(bad)


def test_bad_forward_input():
    seg = build_espnet()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        seg(torch.zeros(1, 8, 8, 3))
    with pytest.raises(TypeError, match="float"):
        seg(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one"):
        seg.predict_logits(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=">= 5"):
        build_espnet(num_classes=3)
    with pytest.raises(ValueError, match="divisible by 8"):
        seg.net(torch.zeros(1, 3, 9, 8))


def test_load_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"espnet-camvid"):
        load("deeplab-camvid")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load(str(tmp_path / "missing.pt"))
    monkeypatch.delenv("SEGCAL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the default data root ../shared/data does not exist from here
    with pytest.raises(FileNotFoundError, match="SEGCAL_DATA is not set"):
        load("espnet-camvid")
    monkeypatch.setenv("SEGCAL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"espnet_pretrained.*espnet_p_2_q_8\.pth"):
        load("espnet-cityscapes")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load(junk)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="ESPNet"):
        load(tmp_path / "other.pt")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    seg = build_espnet()
    with torch.no_grad():
        seg.net.classifier.weight.normal_()
    opt = torch.optim.SGD(seg.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "run" / "last.pt", seg, epoch=3, optimizer=opt.state_dict(),
                           metrics={"miou": 0.5})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "segcal-checkpoint" and ckpt["arch"] == "espnet" and ckpt["epoch"] == 3
    assert ckpt["num_classes"] == 11 and ckpt["metrics"]["miou"] == 0.5
    back = load(path)
    assert back.name == "espnet-camvid" and not back.training
    img = _img(24, 32)
    torch.testing.assert_close(back.predict_logits(img), seg.predict_logits(img))
    assert not (tmp_path / "run" / "last.pt.tmp").exists()


def test_checkpoint_custom_classes_and_errors(tmp_path):
    seg = build_espnet(num_classes=9, class_names=[f"c{i}" for i in range(9)], name="espnet-9")
    assert seg.num_classes == 9 and seg.predict_logits(_img(16, 16)).shape == (9, 16, 16)
    back = load(save_checkpoint(tmp_path / "c.pt", seg))
    assert back.class_names == seg.class_names and back.name == "espnet-9"
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", seg, state_dict={})
    with pytest.raises(TypeError, match="Segmenter"):
        save_checkpoint(tmp_path / "x.pt", nn.Conv2d(1, 1, 1))
    wrapped = save_checkpoint(tmp_path / "w.pt", wrap(nn.Conv2d(3, 2, 1)))
    assert load_checkpoint(wrapped)["arch"] is None
    with pytest.raises(ValueError, match="arch=None"):
        load(wrapped)
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(tmp_path / "trunc.pt")


def test_espnet_trains_on_synthetic_data():
    """A few SGD steps of the untrained ESPNet lower the loss on synthetic blobs: forward is a training path."""
    from segcal.data import SyntheticSegmentation

    torch.manual_seed(0)
    ds = SyntheticSegmentation(4, size=(32, 32), num_classes=5, seed=0)
    seg = build_espnet(num_classes=5, class_names=ds.class_names).train()
    x = seg.preprocess(np.stack([ds[i]["image"] for i in range(4)]))
    y = torch.from_numpy(np.stack([ds[i]["target"] for i in range(4)]))
    opt = torch.optim.Adam(seg.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(seg(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]
