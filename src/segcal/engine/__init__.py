"""segcal.engine: inference into a logits store (:func:`predict`) and the training loop (:class:`Trainer`)."""

from segcal.engine.inference import dist_info, model_fingerprint, predict, store_manifest

__all__ = ["dist_info", "model_fingerprint", "predict", "store_manifest"]
