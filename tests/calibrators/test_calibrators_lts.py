"""LocalTemperatureScaling: the official network (issue 12 item 2) and the pixel budget (issue 14 item 3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from segcal.calibrators import LocalTemperatureScaling
from segcal.calibrators.local_temperature import PAD, LTSNet


def official_temperature(z, img, w, bias, w_img, b_img):
    """Re-derivation of ``LTS_CamVid_With_Image.forward`` (uncbiag/LTS, code/calibration_models.py) from its
    equations: nine separate zero-padded-by-reflect 5×5 dilation-2 convolutions, eight C→1 on the logits
    (conv1..4, param1..3, param_img) and one 3→1 on the image; output ReLU(T + 1) + 1e-8."""
    def conv(x, k, b):
        return F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), k, b, dilation=2)

    c = [conv(z, w[i:i + 1], bias[i:i + 1]) for i in range(8)]
    t1, t2, t3, t4 = (c[i] + 1 for i in range(4))
    p1, p2, p3, pimg = (torch.sigmoid(c[i]) for i in (4, 5, 6, 7))
    t11 = t1 * p1 + t2 * (1 - p1)
    t12 = t3 * p2 + t4 * (1 - p2)
    temp1 = t11 * p3 + t12 * (1 - p3)
    temp2 = conv(img, w_img, b_img) + 1
    t = temp1 * pimg + temp2 * (1 - pimg)
    return F.relu(t + 1) + 1e-8


def test_network_is_the_official_one_with_its_parameter_count():
    c = 11
    net = LTSNet(c, 3, t0=2.0, t_min=1e-12)  # t0 = 2 is the official start: max(m + 1, t_min) vs ReLU(m + 1) + 1e-8
    assert sum(p.numel() for p in net.parameters()) == 2284  # 8·(25·11+1) + (25·3+1), as the official network
    assert sum(p.numel() for p in LTSNet(c, None, 1.0, 1e-12).parameters()) == 7 * (25 * c + 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    z, img = torch.randn(2, c, 20, 24, generator=g) * 3, torch.rand(2, 3, 20, 24, generator=g)
    ref = official_temperature(z, img, net.logit_convs.weight, net.logit_convs.bias, net.img.weight, net.img.bias)
    ours = net(z, img)
    assert (ref < 1e-6).any() and (ref > 1).any()  # both regimes of the ReLU are exercised
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_budget_windows_see_exactly_the_full_image_temperatures():
    c = 4
    net = LTSNet(c, 3, t0=1.3, t_min=0.05)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    z, img = torch.randn(2, c, 30, 40, generator=g), torch.rand(2, 3, 30, 40, generator=g)
    y = torch.randint(0, c, (2, 30, 40), generator=g)
    lts = LocalTemperatureScaling(crop_size=(8, 12), crops_per_image=3)
    gen = torch.Generator().manual_seed(5)
    zw, yw, iw = lts._windows(net, z, y, img, (8, 12), gen)
    assert zw.shape == (6, c, 8 + 2 * PAD, 12 + 2 * PAD) and yw.shape == (6, 8, 12)
    full = net(z, img)
    tw = net(zw, iw, padded=True)
    gen = torch.Generator().manual_seed(5)
    from segcal.calibrators.local_temperature import _crop_origins

    k = 0
    for i in range(2):
        for y0, x0 in _crop_origins(30, 40, 8, 12, 3, gen):
            torch.testing.assert_close(tw[k], full[i, :, y0:y0 + 8, x0:x0 + 12])
            torch.testing.assert_close(yw[k], y[i, y0:y0 + 8, x0:x0 + 12])
            k += 1


def test_budget_fit_is_seeded_learns_and_validates_arguments():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 3, 32, 32, generator=g) * 4
    p = torch.softmax(z / 2.0, 1).permute(0, 2, 3, 1).reshape(-1, 3)
    y = torch.multinomial(p, 1, generator=g).view(4, 32, 32)
    img = torch.rand(4, 3, 32, 32, generator=g)
    a = LocalTemperatureScaling(epochs=3, lr=1e-2, crop_size=16).fit(z, y, images=img)
    b = LocalTemperatureScaling(epochs=3, lr=1e-2, crop_size=16).fit(z, y, images=img)
    c = LocalTemperatureScaling(epochs=3, lr=1e-2, crop_size=16, seed=1).fit(z, y, images=img)
    for k in a.net_state_:
        assert torch.equal(a.net_state_[k], b.net_state_[k])
    assert any(not torch.equal(a.net_state_[k], c.net_state_[k]) for k in a.net_state_)
    whole = LocalTemperatureScaling(epochs=3, lr=1e-2, crop_size=None).fit(z, y, images=img)
    assert whole.history_[-1] <= whole.history_[0] + 1e-6
    for bad in ({"crop_size": 0}, {"crop_size": (4,)}, {"crops_per_image": 0}):
        with pytest.raises(ValueError, match="crop"):
            LocalTemperatureScaling(**bad).fit(z, y, images=img)


def _counting_source(z, y, img, batch):
    passes = []

    def gen():
        passes.append(1)
        for i in range(0, z.shape[0], batch):
            yield {"logits": z[i:i + batch], "target": y[i:i + batch], "images": img[i:i + batch]}

    return gen, passes


def test_budget_reads_the_data_once_whatever_the_epochs_and_caps_the_pool():
    g = torch.Generator().manual_seed(3)
    z, img = torch.randn(5, 3, 24, 20, generator=g) * 3, torch.rand(5, 3, 24, 20, generator=g)
    y = torch.randint(0, 3, (5, 24, 20), generator=g)
    reads = {}
    for epochs in (1, 4):
        source, passes = _counting_source(z, y, img, 2)
        lts = LocalTemperatureScaling(epochs=epochs, lr=1e-2, crop_size=8, crops_per_image=3, max_crops=7,
                                      batch_crops=3).fit(source)
        reads[epochs] = len(passes)
        assert lts.n_crops_ == 7 and len(lts.history_) == epochs
    assert reads[1] == reads[4]  # the TS warm start's passes + one pass for the windows
    source, _ = _counting_source(z, y, img, 2)
    assert LocalTemperatureScaling(epochs=1, crop_size=8, crops_per_image=3).fit(source).n_crops_ == 15
    window_mb = (4 * 6 * 16**2 + 8 * 8**2) / 2**20  # 3 classes + 3 image channels, 8 + 2 PAD = 16 on a side
    capped = LocalTemperatureScaling(epochs=1, crop_size=8, crops_per_image=3, max_pool_mb=4.5 * window_mb)
    assert capped.fit(source).n_crops_ == 4
    whole_source, passes = _counting_source(z, y, img, 2)
    LocalTemperatureScaling(epochs=3, crop_size=None).fit(whole_source)
    assert len(passes) == reads[1] - 1 + 3  # whole images: one pass per epoch


def test_budget_windows_of_different_image_sizes_train_in_separate_steps():
    g = torch.Generator().manual_seed(4)
    batches = [{"logits": torch.randn(2, 3, h, w, generator=g) * 3,
                "target": torch.randint(0, 3, (2, h, w), generator=g),
                "images": torch.rand(2, 3, h, w, generator=g)} for h, w in ((12, 10), (30, 40))]
    lts = LocalTemperatureScaling(epochs=2, lr=1e-2, crop_size=16, crops_per_image=2).fit(batches)
    assert lts.n_crops_ == 8 and all(math.isfinite(v) for v in lts.history_)


def test_budget_fit_does_not_depend_on_the_batching():
    g = torch.Generator().manual_seed(6)
    z, img = torch.randn(6, 3, 20, 20, generator=g) * 3, torch.rand(6, 3, 20, 20, generator=g)
    y = torch.randint(0, 3, (6, 20, 20), generator=g)
    fits = []
    for batch in (1, 4):
        source, _ = _counting_source(z, y, img, batch)
        fits.append(LocalTemperatureScaling(epochs=2, lr=1e-2, crop_size=8, crops_per_image=2, max_crops=5)
                    .fit(source).net_state_)
    for k in fits[0]:
        torch.testing.assert_close(fits[0][k], fits[1][k], rtol=1e-6, atol=1e-7)
