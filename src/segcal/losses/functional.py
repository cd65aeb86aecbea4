"""Functional forms of the losses: ``segcal.losses.functional.nacl(logits, target, ...)`` etc."""

from segcal.losses.aslp import aslp_alpha_update, draw_perturbation, sc_bce, sc_ce
from segcal.losses.cross_entropy import cross_entropy
from segcal.losses.entropy_penalty import entropy_penalty
from segcal.losses.focal import focal
from segcal.losses.label_smoothing import label_smoothing
from segcal.losses.mbls import mbls
from segcal.losses.nacl import nacl
from segcal.losses.svls import svls

__all__ = [
    "aslp_alpha_update",
    "cross_entropy",
    "draw_perturbation",
    "entropy_penalty",
    "focal",
    "label_smoothing",
    "mbls",
    "nacl",
    "sc_bce",
    "sc_ce",
    "svls",
]
