"""One-line definitions of the metrics and methods a report can show, and the direction of each metric.

Direction of a metric column (used to mark the "best" cell):

- ``"zero"``: a calibration error, best = closest to 0 (``|value|`` smallest);
- ``"min"``: smaller is better (NLL, Brier, FPR95, times);
- ``"max"``: larger is better (accuracy, mIoU, AUROC, AP);
- ``None``: not ranked. OE is one-sided (0 for *every* under-confident model), so "lowest OE" would reward
  under-confidence; it is shown, defined, and not ranked.
"""

from __future__ import annotations

#: key -> (display name, direction, one-line definition)
METRICS: dict[str, tuple[str, str | None, str]] = {
    "ece": ("ECE", "zero", "expected calibration error: Σ_b |B_b|/N · |acc_b − conf_b| over equal-width bins of the "
            "top-label confidence (0 = calibrated)"),
    "mce": ("MCE", "zero", "maximum calibration error: the largest |acc_b − conf_b| over non-empty bins"),
    "ace": ("ACE", "zero", "adaptive ECE: the ECE formula over equal-mass bins (each bin holds as many pixels)"),
    "cw_ece": ("cwECE", "zero", "classwise ECE: ECE of each class probability p_k against 1[y = k], averaged over "
               "classes"),
    "image_ece": ("image ECE", "zero", "ECE of each image, averaged over images"),
    "boundary_ece": ("boundary ECE", "zero", "ECE over pixels near a boundary between two labelled classes"),
    "interior_ece": ("interior ECE", "zero", "ECE over the pixels away from class boundaries"),
    "ece_correct": ("ECE (correct px)", "zero", "ECE over correctly classified pixels only (= mean 1 − confidence "
                    "there: under-confidence)"),
    "ece_wrong": ("ECE (wrong px)", "zero", "ECE over misclassified pixels only (= mean confidence there: "
                  "over-confidence on errors)"),
    "oe": ("OE", None, "over-confidence error: Σ_b |B_b|/N · conf_b · max(conf_b − acc_b, 0); one-sided (0 for any "
           "under-confident model), so the report does not rank by it"),
    "nll": ("NLL", "min", "negative log-likelihood: mean −log p(true class); unbounded penalty on confident errors"),
    "brier": ("Brier", "min", "Brier score: mean Σ_k (p_k − 1[y = k])², in [0, 2]"),
    "accuracy": ("accuracy", "max", "pixel accuracy over valid (non-void) pixels"),
    "miou": ("mIoU", "max", "mean intersection-over-union over classes with a non-empty union"),
    "auroc": ("AUROC", "max", "area under the ROC curve of the detector score, positives = errors or OOD pixels "
              "(0.5 = chance)"),
    "ap": ("AP", "max", "average precision: area under precision–recall with the positives as the positive class"),
    "fpr95": ("FPR95", "min", "false-positive rate at the threshold that catches 95 % of the positives"),
    "open_set_miou": ("open-set mIoU", "max", "mIoU with an extra 'unknown' class predicted where the score exceeds "
                      "the F1-optimal threshold"),
    "closed_set_miou": ("closed-set mIoU", "max", "mIoU of the segmentation without the unknown class"),
    "fit_time_s": ("fit time (s)", "min", "seconds to fit the calibrator (not deterministic)"),
    "fit_images": ("fit images", None, "number of images the calibrator was fitted on"),
}

#: per-image variants share the direction of their pooled metric
PER_IMAGE_SUFFIX = "_per_image"

#: method / detector / loss key -> (display name, one-line definition)
METHODS: dict[str, tuple[str, str]] = {
    "uncalibrated": ("uncalibrated", "the model's own softmax, no post-hoc calibration"),
    "ts": ("TS", "temperature scaling: softmax(z / T), one T fitted by NLL on held-out data (Guo et al. 2017)"),
    "vs": ("VS", "vector scaling: softmax(w ⊙ z + b), per-class scale and bias (Guo et al. 2017)"),
    "ms": ("MS", "matrix scaling: softmax(W z + b), full C × C matrix (Guo et al. 2017)"),
    "dirichlet": ("Dirichlet", "Dirichlet calibration: softmax(W log p + b) with off-diagonal regularisation "
                  "(Kull et al. 2019)"),
    "ets": ("ETS", "ensemble temperature scaling: weighted mix of TS, uncalibrated and uniform (Zhang et al. 2020)"),
    "lts": ("LTS", "local temperature scaling: a small network predicts a temperature per pixel (Ding et al. 2021)"),
    "histogram": ("histogram", "histogram binning: each confidence bin is mapped to its held-out accuracy "
                  "(Zadrozny & Elkan 2001)"),
    "isotonic": ("isotonic", "isotonic regression of correctness on confidence (Zadrozny & Elkan 2002)"),
    "selective": ("selective", "selective scaling: a misprediction detector decides which pixels get a separate "
                  "temperature (Wang et al. 2023)"),
    "msp": ("MSP", "maximum softmax probability, as an error score 1 − max p (Hendrycks & Gimpel 2017)"),
    "max_logit": ("max logit", "negative maximum logit (Hendrycks et al. 2022)"),
    "entropy": ("entropy", "entropy of the softmax, −Σ_k p_k log p_k"),
    "energy": ("energy", "free energy, −logsumexp(z) (Liu et al. 2020)"),
    "sml": ("SML", "standardised max logit: max logit normalised by per-class training statistics (Jung et al. 2021)"),
    "flowenedet-u": ("FlowEneDet-U", "normalising flow on the energy map alone (Gudovskiy et al. 2023)"),
    "flowenedet-c": ("FlowEneDet-C", "normalising flow on the energy, conditioned on features (Gudovskiy et al. "
                     "2023)"),
    "ce": ("CE", "cross-entropy training (baseline)"),
    "ls": ("LS", "label smoothing: targets (1 − ε) one-hot + ε/C (Szegedy et al. 2016)"),
    "focal": ("focal", "focal loss −(1 − p_y)^γ log p_y (Lin et al. 2017; Mukhoti et al. 2020)"),
    "ecp": ("ECP", "cross-entropy minus β × entropy: confidence penalty (Pereyra et al. 2017)"),
    "svls": ("SVLS", "spatially varying label smoothing from the neighbourhood labels (Islam & Glocker 2021)"),
    "mbls": ("MbLS", "margin-based label smoothing: penalise logit gaps above a margin (Liu et al. 2022)"),
    "nacl": ("NACL", "neighbour-aware calibration loss: match the prediction to the local label distribution "
             "(Murugesan et al. 2023)"),
    "aslp": ("ASLP", "adaptive stochastic label perturbation, step size set from held-out accuracy (Liu et al. "
             "2023)"),
}


def metric_info(key: str) -> tuple[str, str | None, str] | None:
    """(display name, direction, definition) of a metric column, per-image variants included; None if unknown."""
    if key in METRICS:
        return METRICS[key]
    if key.endswith(PER_IMAGE_SUFFIX) and key.removesuffix(PER_IMAGE_SUFFIX) in METRICS:
        name, direction, text = METRICS[key.removesuffix(PER_IMAGE_SUFFIX)]
        return f"{name} per image", direction, f"{text}; computed per image, then averaged"
    return None


def method_info(key: str) -> tuple[str, str] | None:
    """(display name, definition) of a method key; tokens like ``"ce + ts"`` are looked up by their parts."""
    return METHODS.get(key.strip().lower())


def method_name(key: str) -> str:
    info = method_info(key)
    return info[0] if info else key
