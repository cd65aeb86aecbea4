import pytest
import torch

from segcal.models import build_espnet, load, save_checkpoint


def test_class_name_count_must_match_the_head(tmp_path):
    model = build_espnet("camvid", num_classes=5)
    path = save_checkpoint(tmp_path / "m.pt", model)
    ckpt = torch.load(path, weights_only=True)
    ckpt["class_names"] = ["background", "car"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="2 class names"):
        load(path)
