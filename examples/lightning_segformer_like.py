"""segcal in a Lightning training loop: a calibration loss as the criterion, calibration metrics logged per epoch,
a calibrator fitted after training.

The network is a tiny stand-in for SegFormer: it predicts at 1/4 of the input resolution and the logits are
bilinearly upsampled to the label size before the loss and the metrics (as SegFormer's ``.logits`` must be). The data
is synthetic (blocks of 4 classes with noisy colours and some void pixels), so the example runs on a CPU in seconds:

    python examples/lightning_segformer_like.py --epochs 2

Replace ``TinySegFormer`` and ``blocks_dataset`` with your model and data; nothing else changes.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from segcal.calibrators import TemperatureScaling
from segcal.losses import FocalLoss
from segcal.metrics import (
    BrierScore,
    ExpectedCalibrationError,
    MaximumCalibrationError,
    NegativeLogLikelihood,
    OverconfidenceError,
)

NUM_CLASSES = 4
IGNORE_INDEX = 255


def blocks_dataset(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    """``n`` images of 4x4 blocks of random classes; colour = class colour + noise; one void stripe per image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n, 4, 4), generator=g)
    labels = labels.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2)
    colours = torch.rand(NUM_CLASSES, 3, generator=g)
    images = colours[labels].permute(0, 3, 1, 2) + 0.25 * torch.randn(n, 3, size, size, generator=g)
    labels[:, :, :2] = IGNORE_INDEX
    return TensorDataset(images, labels)


class TinySegFormer(nn.Module):
    """Two stride-2 convolutions and a 1x1 classifier: logits at 1/4 resolution, like SegFormer's decode head."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encoder(x))


class SegModule(L.LightningModule):
    def __init__(self, lr: float = 3e-2) -> None:
        super().__init__()
        self.net = TinySegFormer()
        self.criterion = FocalLoss(gamma=3.0, ignore_index=IGNORE_INDEX)
        self.lr = lr
        # One scalar metric logged on its own ...
        self.ece = ExpectedCalibrationError(num_classes=NUM_CLASSES, n_bins=15, ignore_index=IGNORE_INDEX)
        # ... and a collection: its members share one state, so each batch is binned once for all of them.
        kw: dict[str, Any] = dict(num_classes=NUM_CLASSES, n_bins=15, ignore_index=IGNORE_INDEX, classwise=False)
        self.val_metrics = MetricCollection({"mce": MaximumCalibrationError(**kw), "nll": NegativeLogLikelihood(**kw),
                                             "brier": BrierScore(**kw), "oe": OverconfidenceError(**kw)},
                                            prefix="val/")

    def forward(self, x: Tensor) -> Tensor:
        # SegFormer-style: logits at 1/4 resolution, upsampled to the input size.
        return F.interpolate(self.net(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.ece.update(logits, y)
        self.log("val/ece", self.ece, on_epoch=True)
        self.val_metrics.update(logits, y)
        self.log_dict(self.val_metrics, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@torch.no_grad()
def predict_logits(module: SegModule, loader: DataLoader) -> tuple[Tensor, Tensor]:
    module.eval()
    xs, ys = zip(*[(module(x), y) for x, y in loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


def main(epochs: int = 2, n_train: int = 32, n_val: int = 16, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """Train, log calibration metrics per epoch, then fit temperature scaling on the validation logits."""
    L.seed_everything(seed, verbose=False)
    train = DataLoader(blocks_dataset(n_train, seed=seed), batch_size=batch_size, shuffle=True)
    val = DataLoader(blocks_dataset(n_val, seed=seed + 1), batch_size=batch_size)
    module = SegModule()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        deterministic=True)
    trainer.fit(module, train, val)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}

    # Post-hoc calibration on held-out logits (use a split that was not used for training).
    logits, target = predict_logits(module, val)
    ts = TemperatureScaling(ignore_index=IGNORE_INDEX).fit(logits, target)
    after = ExpectedCalibrationError(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX)
    after.update(ts.transform(logits), target)
    return {"logged": logged, "module": module, "val": val, "temperature": float(ts.temperature_),
            "ece_after_ts": float(after.compute())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    out = main(args.epochs)
    for k, v in sorted(out["logged"].items()):
        print(f"{k:12s} {v:.4f}")
    print(f"temperature  {out['temperature']:.3f}  ->  val/ece {out['ece_after_ts']:.4f} after scaling")
