"""CamVid download code against a local HTTP server (no internet needed)."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcal.data import CamVid
from segcal.data.download import CAMVID_MANIFEST_SHA256, download_camvid, manifest_sha256


def _make_source(src: Path) -> None:
    rng = np.random.default_rng(0)
    stems = {"train": ["0001TP_006690", "0006R0_f02340"], "val": ["0016E5_07959"], "test": ["Seq05VD_f00000"]}
    for split, names in stems.items():
        (src / split).mkdir(parents=True)
        (src / f"{split}annot").mkdir()
        lines = []
        for n in names:
            Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(src / split / f"{n}.png")
            Image.fromarray(rng.integers(0, 12, (4, 6)).astype(np.uint8)).save(src / f"{split}annot" / f"{n}.png")
            lines.append(f"/SegNet/CamVid/{split}/{n}.png /SegNet/CamVid/{split}annot/{n}.png\n")
        (src / f"{split}.txt").write_text("".join(lines))
    (src / "README.md").write_text("not part of the manifest")


@pytest.fixture
def server(tmp_path):
    src = tmp_path / "src" / "CamVid"
    _make_source(src)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(src.parent)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/CamVid", src, requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_verify_and_load(server, tmp_path):
    url, src, requests = server
    expected = manifest_sha256(src)
    root = download_camvid(tmp_path / "camvid", base_url=url, expected_sha256=expected, progress=False)
    assert manifest_sha256(root) == expected
    assert len(requests) == 3 + 2 * 4
    ds = CamVid(root, split="train")
    assert ds.names == ["0001TP_006690", "0006R0_f02340"]
    assert ds[0]["image"].shape == (4, 6, 3)
    assert not list(root.rglob("*.part"))


def test_download_resumes_and_force(server, tmp_path):
    url, src, requests = server
    expected = manifest_sha256(src)
    root = tmp_path / "camvid"
    download_camvid(root, base_url=url, expected_sha256=expected, progress=False)
    (root / "val" / "0016E5_07959.png").unlink()  # as if killed before this file
    requests.clear()
    download_camvid(root, base_url=url, expected_sha256=expected, progress=False)
    assert requests == ["/CamVid/val/0016E5_07959.png"]
    requests.clear()
    download_camvid(root, base_url=url, expected_sha256=expected, progress=False, force=True)
    assert len(requests) == 11


def test_corrupted_file_is_detected(server, tmp_path):
    url, src, _ = server
    expected = manifest_sha256(src)
    with open(src / "test" / "Seq05VD_f00000.png", "ab") as f:
        f.write(b"\0")  # the server now serves a changed file
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_camvid(tmp_path / "camvid", base_url=url, expected_sha256=expected, progress=False)


def test_missing_file_and_bad_arguments(server, tmp_path):
    url, src, _ = server
    (src / "val" / "0016E5_07959.png").unlink()
    with pytest.raises(OSError, match="404"):
        download_camvid(tmp_path / "camvid", base_url=url, expected_sha256=None, progress=False, retries=0)
    with pytest.raises(ValueError, match="splits"):
        download_camvid(tmp_path / "x", base_url=url, splits=["validation"])


def test_partial_splits_skip_full_manifest(server, tmp_path):
    url, _, _ = server
    root = download_camvid(tmp_path / "c", base_url=url, splits=["val"], progress=False)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "val.txt", "val/0016E5_07959.png", "valannot/0016E5_07959.png"]


@pytest.mark.realdata
def test_manifest_constant_matches_the_real_data():
    root = Path(os.environ["SEGCAL_DATA"]) / "camvid"
    assert manifest_sha256(root) == CAMVID_MANIFEST_SHA256
