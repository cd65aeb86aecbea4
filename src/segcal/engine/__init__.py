"""segcal.engine: inference into a logits store (:func:`predict`) and the training loop (:class:`Trainer`)."""

from segcal.engine.inference import dataset_id, dist_info, model_fingerprint, predict, store_manifest
from segcal.engine.training import TrainConfig, Trainer, cross_entropy, evaluate_model, train

__all__ = ["TrainConfig", "Trainer", "cross_entropy", "dataset_id", "dist_info", "evaluate_model", "model_fingerprint",
           "predict", "store_manifest", "train"]
