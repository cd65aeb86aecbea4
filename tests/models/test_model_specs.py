"""Model specs: a user's model from a .py file, a module, TorchScript, checkpoints; output formats; bad files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from segcal.models import Segmenter, extract_logits, load, resolve_device, save_checkpoint, wrap

USER_MODEL = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Conv2d(3, 5, 1)

def build_segmenter():
    from segcal.models import wrap
    return wrap(build(), preprocess="none", class_names=["a", "b", "c", "d", "e"], name="mine")

not_callable = 3

def returns_int():
    return 7
"""


def _img(h=6, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _ref_none(net: nn.Module, img: np.ndarray) -> torch.Tensor:
    """Logits of ``net`` on float RGB 0-255 (preprocess="none"), computed by hand."""
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    w, b = net.weight.detach().double(), net.bias.detach().double()
    return (torch.einsum("oc,nchw->nohw", w[:, :, 0, 0], x) + b[None, :, None, None])[0]


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    f = tmp_path / "usermodel.py"
    f.write_text(USER_MODEL)
    return f


def test_file_callable_five_classes(user_file: Path) -> None:
    seg = load(f"{user_file}:build", preprocess="none", device="cpu")
    assert isinstance(seg, Segmenter) and seg.num_classes == 5
    assert seg.class_names == [f"class_{i}" for i in range(5)]
    assert seg.name == "usermodel.py:build" and not seg.training
    img = _img()
    torch.testing.assert_close(seg.predict_logits(img).double(), _ref_none(seg.net, img), rtol=1e-5, atol=1e-4)
    # the default preprocess is ImageNet normalisation: different logits from the same weights
    seg_in = load(f"{user_file}:build", device="cpu")
    assert not torch.allclose(seg_in.predict_logits(img), seg.predict_logits(img))


def test_file_callable_returning_segmenter_is_used_as_is(user_file: Path) -> None:
    seg = load(f"{user_file}:build_segmenter")
    assert seg.name == "mine" and seg.class_names == list("abcde")
    assert seg.device == resolve_device(None)


def test_package_module_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "userpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    seg = load("userpkg.sub.nets:build", preprocess="none", device="cpu")
    assert seg.num_classes == 5 and seg.name == "userpkg.sub.nets:build"
    img = _img(seed=3)
    torch.testing.assert_close(seg.predict_logits(img).double(), _ref_none(seg.net, img), rtol=1e-5, atol=1e-4)


def test_callable_spec_errors(user_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        load(f"{user_file}:nope")
    with pytest.raises(TypeError, match="not a callable"):
        load(f"{user_file}:not_callable")
    with pytest.raises(TypeError, match=r"returned a int; it must return a torch.nn.Module"):
        load(f"{user_file}:returns_int")
    with pytest.raises(FileNotFoundError, match="Python file not found"):
        load(f"{tmp_path / 'missing.py'}:build")
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_pkg_xyz\.mod'"):
        load("no_such_pkg_xyz.mod:build")
    with pytest.raises(ValueError, match=":build'"):
        load(user_file)  # a .py file without the callable
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(ValueError, match="boom at import"):
        load(f"{broken}:build")
    with pytest.raises(ValueError, match=r"file\.py:callable"):
        load("not-a-model-name")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = nn.Conv2d(3, 5, 1)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    seg = load(path, preprocess="none", device="cpu")
    assert seg.num_classes == 5 and seg.name == "scripted"
    img = _img(seed=2)
    torch.testing.assert_close(seg.predict_logits(img).double(), _ref_none(net, img), rtol=1e-5, atol=1e-4)


class _Sample:
    """MMSegmentation SegDataSample stand-in: ``.seg_logits`` is a PixelData with ``.data`` (C, H, W)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.seg_logits = SimpleNamespace(data=logits)


class _MMSegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> list:
        return [_Sample(y) for y in self.conv(x)]


class _AnyOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        y = self.conv(x)
        return {"dict_out": {"out": y, "aux": y[:, :1]}, "dict_logits": {"logits": y},
                "dict_seg": {"seg_logits": y}, "attr_logits": SimpleNamespace(logits=y),
                "attr_seg": SimpleNamespace(seg_logits=y), "tuple": (y, y[:, :2])}[self.kind]


@pytest.mark.parametrize("kind", ["dict_out", "dict_logits", "dict_seg", "attr_logits", "attr_seg", "tuple"])
def test_output_formats(kind: str) -> None:
    net = _AnyOut(kind)
    seg = wrap(net, preprocess="none")
    assert seg.num_classes == 5
    img = _img()
    torch.testing.assert_close(seg.predict_logits(img).double(), _ref_none(net.conv, img), rtol=1e-5, atol=1e-4)


def test_mmseg_style_list_is_stacked() -> None:
    net = _MMSegNet()
    seg = wrap(net, preprocess="none")
    assert seg.num_classes == 5
    imgs = np.stack([_img(seed=0), _img(seed=1)])
    out = seg.predict_batch(imgs)
    assert out.shape == (2, 5, 6, 7)
    torch.testing.assert_close(out[1].double(), _ref_none(net.conv, imgs[1]), rtol=1e-5, atol=1e-4)
    bad = [SimpleNamespace(seg_logits=SimpleNamespace(data=torch.zeros(2, 3)))]
    with pytest.raises(TypeError, match=r"expected a \(C, H, W\) tensor"):
        extract_logits(bad)


def test_unknown_output_asks_for_output_argument() -> None:
    class _Masks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x: torch.Tensor) -> object:
            return {"masks": self.conv(x)}

    with pytest.raises(TypeError, match="pass `output=`"):
        wrap(_Masks())
    with pytest.raises(TypeError, match="pass `output=`"):
        extract_logits(SimpleNamespace(masks=1))
    net = _Masks()
    seg = wrap(net, preprocess="none", output=lambda out: out["masks"])
    img = _img()
    torch.testing.assert_close(seg.predict_logits(img).double(), _ref_none(net.conv, img), rtol=1e-5, atol=1e-4)
    with pytest.raises(TypeError, match="must return the logits"):
        wrap(net, output=lambda out: out)
    with pytest.raises(TypeError, match="`output` must be a callable"):
        wrap(net, output=3)  # type: ignore[arg-type]


def test_load_module_object_and_output_argument(user_file: Path) -> None:
    seg = load(f"{user_file}:build", output=lambda y: y[:, :3], preprocess="none")
    assert seg.num_classes == 3


def test_wrapped_checkpoint_says_how_and_loads_with_weights_suffix(user_file: Path, tmp_path: Path) -> None:
    seg = load(f"{user_file}:build", preprocess="none", device="cpu")
    with torch.no_grad():
        seg.net.weight.add_(1.0)  # "fine-tuned"
    seg.class_names = list("vwxyz")
    ckpt = save_checkpoint(tmp_path / "tuned.pt", seg, epoch=2)
    with pytest.raises(ValueError, match=r"arch=None.*yourmodel.py:build@CHECKPOINT"):
        load(ckpt)
    again = load(f"{user_file}:build@{ckpt}", preprocess="none", device="cpu")
    torch.testing.assert_close(again.net.weight, seg.net.weight)
    assert again.class_names == list("vwxyz")
    img = _img()
    torch.testing.assert_close(again.predict_logits(img), seg.predict_logits(img))
    # a raw state_dict of the bare network works too
    torch.save(seg.net.state_dict(), tmp_path / "raw.pth")
    raw = load(f"{user_file}:build@{tmp_path / 'raw.pth'}", preprocess="none", device="cpu")
    torch.testing.assert_close(raw.net.weight, seg.net.weight)
    # weights of another shape: one line naming the mismatch
    torch.save({"weight": torch.zeros(4, 3, 1, 1), "bias": torch.zeros(4)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="shape mismatch") as info:
        load(f"{user_file}:build@{tmp_path / 'other.pth'}")
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load(f"{user_file}:build@{tmp_path / 'missing.pt'}")


def _bad_files(tmp_path: Path, good: Path) -> list[Path]:
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    evil = tmp_path / "evil.pt"
    torch.save({"x": __import__("subprocess").Popen}, evil)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    meta = tmp_path / "meta.pt"
    torch.save({"conv.conv.weight": torch.empty(2, 2, device="meta")}, meta)
    return [trunc, evil, empty, meta]


def test_malicious_truncated_meta_files_give_one_line_errors(user_file: Path, tmp_path: Path) -> None:
    from segcal.models import load_checkpoint
    from segcal.models.pretrained import build_espnet

    good = save_checkpoint(tmp_path / "good.pt", build_espnet())
    for bad in _bad_files(tmp_path, good):
        for call in (lambda p: load(p), load_checkpoint, lambda p: load(f"{user_file}:build@{p}")):
            with pytest.raises(ValueError, match=r"^cannot read ") as info:
                call(bad)
            assert "\n" not in str(info.value), str(info.value)


def test_meta_model_and_empty_batches_are_refused() -> None:
    with torch.device("meta"):
        net = nn.Conv2d(3, 5, 1)
    with pytest.raises(ValueError, match="meta device"):
        wrap(net)
    seg = Segmenter(net, num_classes=5, preprocess=lambda im: im.permute(0, 3, 1, 2).float())
    with pytest.raises(ValueError, match="meta device"):
        seg.predict_batch(np.stack([_img()]))
    with pytest.raises(ValueError, match="meta device"):
        load(seg)
    ok = wrap(nn.Conv2d(3, 5, 1))
    with pytest.raises(ValueError, match="empty"):
        ok.predict_batch(np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        ok.predict_batch(np.zeros((2, 0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        ok(torch.zeros(0, 3, 4, 4))


def test_device_resolution() -> None:
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="`device`"):
        resolve_device("warp-drive")


def test_module_names_in_user_file_are_isolated(tmp_path: Path) -> None:
    # two files with the same stem in different folders load their own code
    for sub, c in (("a", 3), ("b", 4)):
        d = tmp_path / sub
        d.mkdir()
        (d / "net.py").write_text(textwrap.dedent(f"""
            from torch import nn
            def build():
                return nn.Conv2d(3, {c}, 1)
        """))
    assert load(f"{tmp_path / 'a' / 'net.py'}:build").num_classes == 3
    assert load(f"{tmp_path / 'b' / 'net.py'}:build").num_classes == 4
