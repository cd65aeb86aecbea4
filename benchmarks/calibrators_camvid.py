"""Post-hoc calibrators on real ESPNet logits, with the Selective-Scaling analysis (issue 7, "Show").

Usage:
    SEGCAL_DATA=/work/shared/data nice -n 5 .venv/bin/python benchmarks/calibrators_camvid.py \\
        [--out cache/calibrators] [--quick] [--test-stride 2] [--max-pixels 2000000]

Protocols (every calibrator; ECE with 15 bins, plus 10-bin ECE for comparability with the paper):

1. **In-domain** (the paper's): CamVid val (101 frames, all from sequence 0016E5) is split **by image** with a fixed
   seed into fit / select / held-out (50 / 20 / 30 %). Calibrators are fitted on *fit*; hyperparameters (Dirichlet
   ODIR λ, histogram bins, Selective threshold × base × T_mis) are chosen on *select* by 15-bin ECE; results on
   *held-out*.
2. **Shift**: the chosen hyperparameters are refitted on **all of val** and evaluated on CamVid test (sequences
   ``Seq05VD`` — unseen — and ``0001TP`` — dusk — separately and pooled), and on the Cityscapes-model→CamVid case
   (calibrators fitted on ESPNet-Cityscapes' CamVid-val logits, evaluated on its CamVid-test logits). Nothing is
   tuned on test.

Moonshot variants of Selective Scaling (reported whether or not they win):

- ``sel-corrupt``: the calibrator is fitted on val **plus** the logits of corrupted val images
  (:class:`~segcal.data.corruptions.CorruptedDataset`, every second val frame, a few corruption types, their own
  correctness labels), so the detector sees mispredictions of degraded inputs. ``ts-corrupt`` is the control: TS fitted
  on the same union (does the gain come from the detector or just from the data?).
- ``sel-rate``: a label-free test-time flag-rate correction: in every image the detector flags its top-k pixels,
  k = (1 − mean TS confidence of the image) × pixels, i.e. as many pixels as TS expects to be wrong, instead of a
  fixed threshold.

Speed choices (say so in the docs): VS / MS / Dirichlet / ETS are fitted on a seeded sample of ``--max-pixels``
valid pixels; LTS is trained for ``--lts-epochs`` epochs; the test stores are evaluated on every ``--test-stride``-th
frame. The Selective detector is trained once per fit set and reused by variants that only differ in threshold,
T_mis or base (training is seeded and deterministic, so this equals separate fits).

Resumable: fitted calibrators are cached under ``<out>/fits`` (``*.pt`` + fit time), evaluations under
``<out>/evals``; corrupted-val logits under ``<out>/corrupt``. ``--quick`` is a smoke run into ``<out>/quick``.
Results: ``<out>/results.json`` and Markdown tables in ``<out>/tables.md`` (also printed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from segcal.calibrators import SelectiveScaling, TemperatureScaling, get_calibrator, load
from segcal.data import CamVid, LogitsStore, sequence_of
from segcal.data.corruptions import CorruptedDataset
from segcal.detectors import msp
from segcal.engine.evaluate import to_jsonable
from segcal.metrics import CalibrationMetrics, DetectionMetrics

IGNORE = 255
SEQS = ("Seq05VD", "0001TP")
MAIN_COLS = ("ece", "ece10", "mce", "ace", "cw_ece", "nll", "brier", "miou", "boundary_ece", "interior_ece")


# ---------------------------------------------------------------------------------------------------- data sources
class Source:
    """Batches of one logits store restricted to ``names`` (+ the CamVid images when a calibrator needs them)."""

    def __init__(self, store: LogitsStore, names: list[str], images: CamVid | None = None, batch_size: int = 4):
        self.store, self.names, self.images, self.batch_size = store, list(names), images, batch_size

    def load_images(self, names: list[str]) -> Tensor:
        assert self.images is not None
        return torch.stack([torch.from_numpy(self.images.load_image(n.split("@")[0])).permute(2, 0, 1)
                            for n in names])

    def __call__(self, with_images: bool = False) -> Iterator[dict[str, Any]]:
        for b in self.store.batches(batch_size=self.batch_size, names=self.names):
            d = {"logits": b["logits"], "target": b["target"], "names": b["names"]}
            if with_images:
                d["images"] = self.load_images(b["names"])
            yield d

    def fit_source(self, with_images: bool = False) -> Callable[[], Iterator[dict[str, Any]]]:
        return lambda: self(with_images)

    def union(self, *others: Source) -> Callable[[], Iterator[dict[str, Any]]]:
        def gen() -> Iterator[dict[str, Any]]:
            for s in (self, *others):
                yield from s()
        return gen


# --------------------------------------------------------------------------------------- cached Selective detector
_DETECTORS: dict[str, tuple[Any, int, dict]] = {}


class _SharedDetectorSelective(SelectiveScaling):
    """SelectiveScaling whose detector training is memoised on its exact inputs (seeded → identical result)."""

    def _train_detector(self, z_tr: Tensor, c_tr: Tensor, z_va: Tensor, c_va: Tensor, c: int,
                        gen: torch.Generator) -> Any:
        h = hashlib.sha1()
        for t in (z_tr, c_tr, z_va, c_va):
            h.update(t.contiguous().numpy().tobytes())
        h.update(repr((self.epochs, self.lr, self.weight_decay, self.batch_size, self.seed)).encode())
        key = h.hexdigest()
        if key not in _DETECTORS:
            det = super()._train_detector(z_tr, c_tr, z_va, c_va, c, gen)
            _DETECTORS[key] = (det, self.best_epoch_, self.history_)
        det, self.best_epoch_, self.history_ = _DETECTORS[key]
        return copy.deepcopy(det)


def make_selective(base: str | None, t_mis: Any, threshold: float, epochs: int) -> SelectiveScaling:
    return _SharedDetectorSelective(base=TemperatureScaling() if base == "ts" else None, mis_temperature=t_mis,
                                    threshold=threshold, epochs=epochs)


# ------------------------------------------------------------------------------------------ rate-flagging variant
class RateSelective:
    """Moonshot "sel-rate": per image flag the top-k detector scores, k = (1 − mean TS confidence) × pixels."""

    def __init__(self, sel: SelectiveScaling, ts: TemperatureScaling) -> None:
        self.sel, self.ts = sel, ts
        self.temperature_mis_ = sel.temperature_mis_

    def flags(self, z: Tensor) -> Tensor:
        p = self.sel.misprediction_proba(z)
        conf = torch.softmax(z.float() / self.ts.temperature_, 1).amax(1)
        n, h, w = p.shape
        out = torch.zeros_like(p, dtype=torch.bool)
        for i in range(n):
            k = round(float(1.0 - conf[i].mean()) * h * w)
            if k > 0:
                idx = torch.topk(p[i].flatten(), k).indices
                out[i].view(-1)[idx] = True
        return out

    def transform(self, z: Tensor, images: Tensor | None = None) -> Tensor:
        z = z.float()
        mis = self.flags(z)[:, None]
        kept = self.sel.base_.transform(z) if self.sel.base_ is not None else z
        return torch.where(mis, z / self.sel.temperature_mis_, kept)


# -------------------------------------------------------------------------------------------------- evaluation
def _add_states(total: CalibrationMetrics, part: CalibrationMetrics) -> None:
    for name in part._defaults:
        setattr(total, name, getattr(total, name) + getattr(part, name))


class Extra:
    """Cheap sums: 10/15-bin ECE, ECE on correct / mispredicted pixels, NLL, detector flag statistics."""

    def __init__(self, detector: bool) -> None:
        self.bins = {n: torch.zeros(3, n, dtype=torch.float64) for n in (10, 15)}
        self.s = dict.fromkeys(("n", "correct", "conf_correct", "conf_mis", "nll", "flag", "flag_mis",
                                "flag_conf", "flag_correct", "unflag_conf", "unflag_correct"), 0.0)
        self.det = DetectionMetrics() if detector else None
        self.hist = torch.zeros(2, 1000, dtype=torch.float64)  # detector score histogram (correct, mis)

    def update(self, zc: Tensor, y: Tensor, flags: Tensor | None, score: Tensor | None) -> None:
        valid = y != IGNORE
        logp = torch.log_softmax(zc.float(), 1)
        lp, pred = logp.max(1)
        conf = lp.exp()[valid]
        ok = (pred == y)[valid]
        yv = y.clamp_max(zc.shape[1] - 1)
        nll = -logp.gather(1, yv[:, None])[:, 0][valid]
        s = self.s
        s["n"] += conf.numel()
        s["correct"] += float(ok.sum())
        s["conf_correct"] += float(conf[ok].double().sum())
        s["conf_mis"] += float(conf[~ok].double().sum())
        s["nll"] += float(nll.double().sum())
        for n, b in self.bins.items():
            idx = (torch.ceil(conf.double() * n) - 1).clamp(0, n - 1).long()
            b[0].index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
            b[1].index_add_(0, idx, conf.double())
            b[2].index_add_(0, idx, ok.double())
        if flags is not None:
            f = flags[valid]
            s["flag"] += float(f.sum())
            s["flag_mis"] += float((f & ~ok).sum())
            s["flag_conf"] += float(conf[f].double().sum())
            s["flag_correct"] += float(ok[f].sum())
            s["unflag_conf"] += float(conf[~f].double().sum())
            s["unflag_correct"] += float(ok[~f].sum())
        if score is not None and self.det is not None:
            self.det.update(score, (pred != y) & valid, valid)
            sc = score[valid].double()
            idx = (sc * 1000).long().clamp(0, 999)
            self.hist[0].index_add_(0, idx[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
            self.hist[1].index_add_(0, idx[~ok], torch.ones(int((~ok).sum()), dtype=torch.float64))

    def add(self, other: Extra) -> None:
        for n in self.bins:
            self.bins[n] += other.bins[n]
        for k in self.s:
            self.s[k] += other.s[k]
        self.hist += other.hist
        if self.det is not None and other.det is not None:
            for name in other.det._defaults:
                setattr(self.det, name, getattr(self.det, name) + getattr(other.det, name))

    def compute(self) -> dict[str, Any]:
        s = self.s
        n = max(s["n"], 1.0)
        nc, nm = s["correct"], s["n"] - s["correct"]
        out: dict[str, Any] = {"n_pixels": s["n"], "accuracy": nc / n, "nll": s["nll"] / n}
        for nb, b in self.bins.items():
            out[f"ece{nb}"] = float(((b[1] - b[2]).abs().sum()) / n)
        out["ece_correct"] = (nc - s["conf_correct"]) / max(nc, 1)  # = mean(1 − conf) on correct pixels
        out["ece_mis"] = s["conf_mis"] / max(nm, 1)  # = mean(conf) on mispredicted pixels
        out["mean_conf"] = (s["conf_correct"] + s["conf_mis"]) / n
        if s["flag"] or s["unflag_conf"]:
            nf, nu = s["flag"], s["n"] - s["flag"]
            out.update(flag_rate=nf / n, error_rate=nm / n, recall=s["flag_mis"] / max(nm, 1),
                       precision=s["flag_mis"] / max(nf, 1),
                       det_accuracy=(s["flag_mis"] + (nc - s["flag_correct"])) / n,
                       flagged_conf=s["flag_conf"] / max(nf, 1), flagged_acc=s["flag_correct"] / max(nf, 1),
                       unflagged_conf=s["unflag_conf"] / max(nu, 1), unflagged_acc=s["unflag_correct"] / max(nu, 1))
        if self.det is not None and float(self.hist.sum()) > 0:
            d = self.det.compute()
            out.update(auroc=float(d["auroc"]), ap=float(d["ap"]), fpr95=float(d["fpr95"]))
        return out


def msp_best_threshold(hist: Tensor) -> float:
    """Threshold on an MSP-score histogram (correct, mis) maximising detector accuracy (flag = score > t)."""
    corr, mis = hist[0], hist[1]
    # flag bins >= j: correct-flags = sum corr[j:], mis-caught = sum mis[j:]
    caught = mis.flip(0).cumsum(0).flip(0)
    fp = corr.flip(0).cumsum(0).flip(0)
    acc = caught + (corr.sum() - fp)
    j = int(acc.argmax())
    return j / 1000.0


def msp_accuracy(hist: Tensor, t: float) -> float:
    j = round(t * 1000)
    corr, mis = hist[0], hist[1]
    return float((mis[j:].sum() + corr[:j].sum()) / hist.sum())


def evaluate(methods: dict[str, Any], src: Source, groups: dict[str, list[str]], full: bool,
             log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """One pass over ``src``: every method × every group (+ pooled "all" when several groups)."""
    c = src.store.num_classes
    group_of = {n: g for g, ns in groups.items() for n in ns}
    needs_img = any(getattr(m, "needs_images", False) for m in methods.values())
    metrics: dict[tuple[str, str], CalibrationMetrics] = {}
    extras: dict[tuple[str, str], Extra] = {}
    for name in ["msp", *methods]:
        for g in groups:
            if full and name != "msp":
                metrics[name, g] = CalibrationMetrics(c, n_bins=15, ignore_index=IGNORE, boundary_width=2)
            extras[name, g] = Extra(detector=name == "msp" or _is_selective(methods.get(name)))
    t0, done = time.time(), 0
    with torch.inference_mode():
        for b in src(with_images=False):
            names = b["names"]
            imgs = src.load_images(names) if needs_img else None
            for g in {group_of[n] for n in names}:
                idx = [i for i, n in enumerate(names) if group_of[n] == g]
                z, y = b["logits"][idx], b["target"][idx]
                im = imgs[idx] if imgs is not None else None
                extras["msp", g].update(z, y, None, msp(z))
                for name, m in methods.items():
                    zc = m.transform(z, im) if getattr(m, "needs_images", False) else (
                        z if m is None else m.transform(z))
                    flags, score = None, None
                    if _is_selective(m):
                        score = m.misprediction_proba(z) if isinstance(m, SelectiveScaling) else \
                            m.sel.misprediction_proba(z)
                        flags = m.flags(z) if isinstance(m, RateSelective) else score > m.threshold
                    extras[name, g].update(zc, y, flags, score)
                    if full:
                        metrics[name, g].update(zc, y)
            done += len(names)
            if done % 20 < len(names):
                log(f"    {done}/{len(src.names)} images, {time.time() - t0:.0f}s")
    out: dict[str, dict[str, Any]] = {}
    gl = list(groups) + (["all"] if len(groups) > 1 else [])
    for name in ["msp", *methods]:
        for g in gl:
            if g == "all":
                ex = Extra(detector=extras[name, gl[0]].det is not None)
                for g2 in groups:
                    ex.add(extras[name, g2])
            else:
                ex = extras[name, g]
            r = ex.compute()
            if full and name != "msp":
                if g == "all":
                    cm = CalibrationMetrics(c, n_bins=15, ignore_index=IGNORE, boundary_width=2)
                    for g2 in groups:
                        _add_states(cm, metrics[name, g2])
                else:
                    cm = metrics[name, g]
                v = cm.compute()
                for k in ("ece", "mce", "ace", "cw_ece", "nll", "brier", "miou", "accuracy", "boundary_ece",
                          "interior_ece"):
                    r[k] = float(v[k])
            else:
                r["ece"] = r["ece15"]
            if name == "msp":
                r["_hist"] = ex.hist.tolist()
            out.setdefault(name, {})[g] = r
    return out


def _is_selective(m: Any) -> bool:
    return isinstance(m, (SelectiveScaling, RateSelective))


# ------------------------------------------------------------------------------------------------------ fitting
class Fitter:
    def __init__(self, root: Path, log: Callable[[str], None]) -> None:
        self.root, self.log = root, log
        root.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}

    def fit(self, key: str, make: Callable[[], Any], source: Callable[[], Iterator]) -> Any:
        path, tpath = self.root / f"{key}.pt", self.root / f"{key}.time"
        if path.exists() and tpath.exists():
            cal = load(path)
            self.times[key] = float(tpath.read_text())
            if isinstance(cal, SelectiveScaling):
                cal.__class__ = _SharedDetectorSelective
            return cal
        cal = make()
        t = time.time()
        cal.fit(source)
        dt = time.time() - t
        if isinstance(cal, _SharedDetectorSelective):  # save as the library class (loadable by segcal.calibrators.load)
            cal.__class__ = SelectiveScaling
            cal.save(path)
            cal.__class__ = _SharedDetectorSelective
        else:
            cal.save(path)
        tpath.write_text(f"{dt:.3f}")
        self.times[key] = dt
        extra = f" T={cal.temperature_:.3f}" if hasattr(cal, "temperature_") else ""
        if isinstance(cal, SelectiveScaling):
            extra = f" T_mis={cal.temperature_mis_:.3f} best_epoch={cal.best_epoch_}" + (
                f" base T={cal.base_.temperature_:.3f}" if cal.base_ is not None else "")
        self.log(f"  fit {key}: {dt:.1f}s{extra}")
        return cal


def baseline_specs(mp: int, lts_epochs: int) -> dict[str, list[tuple[str, dict]]]:
    """name → grid of (label, kwargs for get_calibrator); grids with > 1 point are chosen on select."""
    return {
        "ts": [("ts", {})],
        "vs": [("vs", {"max_pixels": mp})],
        "ms": [("ms", {"max_pixels": mp})],
        "dirichlet": [(f"dirichlet-l{lam:g}", {"reg_lambda": lam, "max_pixels": mp}) for lam in (0.0, 1e-2)],
        "ets": [("ets", {"max_pixels": mp})],
        "lts": [("lts", {"epochs": lts_epochs})],
        "histogram": [(f"histogram-b{b}", {"n_bins": b}) for b in (10, 15, 30)],
        "isotonic": [("isotonic", {})],
    }


def selective_grid(quick: bool) -> list[tuple[str, dict]]:
    thr = (0.5,) if quick else (0.3, 0.5)
    tm: tuple[Any, ...] = ("fit", 2.0) if quick else ("fit", 1000.0)
    out = []
    for base in (None, "ts"):
        for t in thr:
            for m in tm:
                lab = f"sel-{base or 'id'}-t{t:g}-T{m if m == 'fit' else f'{m:g}'}"
                out.append((lab, {"base": base, "t_mis": m, "threshold": t}))
    return out


# --------------------------------------------------------------------------------------------------- main
def split_val(names: list[str], seed: int, fracs: tuple[float, float]) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    perm = sorted(names)
    rng.shuffle(perm)
    n_fit, n_sel = round(fracs[0] * len(perm)), round(fracs[1] * len(perm))
    return sorted(perm[:n_fit]), sorted(perm[n_fit:n_fit + n_sel]), sorted(perm[n_fit + n_sel:])


class _Subset:
    def __init__(self, ds: Any, idx: list[int]) -> None:
        self.ds, self.idx = ds, idx
        self.num_classes = getattr(ds, "num_classes", None)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.ds[self.idx[i]]


def corrupted_stores(model_name: str, out: Path, corruptions: list[str], every: int, limit: int | None,
                     log: Callable[[str], None]) -> list[LogitsStore]:
    from segcal.engine import predict
    from segcal.models import load as load_model

    val = CamVid(split="val")
    idx = list(range(0, len(val), every))[:limit]
    stores, model = [], None
    for spec in corruptions:
        name, sev = spec.rsplit("-", 1)
        path = out / model_name / spec
        ds = CorruptedDataset(_Subset(val, idx), name, int(sev), seed=0)
        try:
            st = LogitsStore(path)
            if len(st) == len(idx):
                stores.append(st)
                continue
        except (FileNotFoundError, ValueError):
            pass
        if model is None:
            model = load_model(model_name)
        t = time.time()
        stores.append(predict(model, ds, path, batch_size=4, progress=False))
        log(f"  predicted {model_name} {spec} ({len(idx)} val images): {time.time() - t:.0f}s")
    return stores


def test_store(model_name: str, out: Path) -> LogitsStore:
    """The shared test store if complete, else this benchmark's own copy (``<out>/logits/<model>/test``)."""
    shared = LogitsStore(f"cache/logits/{model_name}/test")
    if len(shared) >= 233:
        return shared
    own = out / "logits" / model_name / "test"
    if not own.exists():
        own = Path("cache/calibrators/logits") / model_name / "test"
    if own.exists() and len(LogitsStore(own)) >= 233:
        return LogitsStore(own)
    return shared


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="cache/calibrators")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-stride", type=int, default=6)
    ap.add_argument("--max-pixels", type=int, default=300_000)
    ap.add_argument("--lts-epochs", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=40, help="Selective detector epochs")
    ap.add_argument("--corruptions", default="darkness-3,fog-2,gaussian_noise-2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="espnet-camvid,espnet-cityscapes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out) / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    q = args.quick
    mp = 50_000 if q else args.max_pixels
    epochs = 2 if q else args.epochs
    lts_epochs = 1 if q else args.lts_epochs
    stride = 40 if q else args.test_stride
    corruptions = args.corruptions.split(",")[:1] if q else args.corruptions.split(",")
    results: dict[str, Any] = {"args": vars(args), "protocols": {}}
    val_img, test_img = CamVid(split="val"), CamVid(split="test")

    for model_name in args.models.split(","):
        log(f"=== {model_name}")
        vstore = LogitsStore(f"cache/logits/{model_name}/val")
        tstore = test_store(model_name, Path(args.out))
        log(f"  test store {tstore.path} ({len(tstore)} images)")
        if len(tstore) < 233 and not q:
            log(f"  WARNING: test store has {len(tstore)}/233 images")
        vnames = vstore.names[::6] if q else vstore.names
        fit_n, sel_n, held_n = split_val(vnames, args.seed, (0.5, 0.2))
        tnames = sorted(tstore.names)[::stride]
        groups = {s: [n for n in tnames if sequence_of(n) == s] for s in SEQS}
        groups = {k: v for k, v in groups.items() if v}
        res: dict[str, Any] = {"split": {"fit": fit_n, "select": sel_n, "held_out": held_n},
                               "test_images": len(tnames)}
        fits = Fitter(out / "fits" / model_name, log)
        cstores = corrupted_stores(model_name, out / "corrupt", corruptions, 2, 3 if q else None, log)

        # ---------------- protocol 1: in-domain
        log("  in-domain: fitting on fit part")
        src_fit = Source(vstore, fit_n, val_img)
        src_sel = Source(vstore, sel_n, val_img)
        src_held = Source(vstore, held_n, val_img)
        specs = baseline_specs(mp, lts_epochs)
        cands: dict[str, Any] = {}
        for grid in specs.values():
            for lab, kw in grid:
                name = lab.split("-")[0]
                cands[lab] = fits.fit(f"indomain-{lab}", lambda n=name, k=kw: get_calibrator(n, **k),
                                      src_fit.fit_source(with_images=(name == "lts")))
        sgrid = selective_grid(q)
        for lab, kw in sgrid:
            cands[lab] = fits.fit(f"indomain-{lab}", lambda k=kw: make_selective(k["base"], k["t_mis"],
                                                                                  k["threshold"], epochs),
                                  src_fit.fit_source())
        # moonshot, in-domain: corrupted versions of the fit-part images only
        fit_set = set(fit_n)
        csrc_fit = [Source(cs, [n for n in cs.names if n.split("@")[0] in fit_set]) for cs in cstores]
        csrc_fit = [s for s in csrc_fit if s.names]
        log("  in-domain: selecting on select part")
        sel_eval = evaluate(cands, src_sel, {"select": sel_n}, full=False, log=log)
        chosen: dict[str, str] = {}
        for fam, grid in specs.items():
            chosen[fam] = min((lab for lab, _ in grid), key=lambda lab: sel_eval[lab]["select"]["ece15"])
        sel_labels = [lab for lab, _ in sgrid]
        chosen["selective"] = min(sel_labels, key=lambda lab: sel_eval[lab]["select"]["ece15"])
        chosen["selective-id"] = min((lab for lab in sel_labels if "-id-" in lab),
                                     key=lambda lab: sel_eval[lab]["select"]["ece15"])
        chosen["selective-ts"] = min((lab for lab in sel_labels if "-ts-" in lab),
                                     key=lambda lab: sel_eval[lab]["select"]["ece15"])
        log(f"  chosen on select: {chosen}")
        ckw = dict(sgrid)[chosen["selective"]]
        moon_in = {}
        if csrc_fit:
            moon_in["sel-corrupt"] = fits.fit("indomain-sel-corrupt", lambda k=ckw: make_selective(
                k["base"], k["t_mis"], k["threshold"], epochs), src_fit.union(*csrc_fit))
            moon_in["ts-corrupt"] = fits.fit("indomain-ts-corrupt", lambda: get_calibrator("ts"),
                                             src_fit.union(*csrc_fit))
        ts_in = cands["ts"]
        report_in: dict[str, Any] = {"uncal": None}
        for fam in specs:
            report_in[fam] = cands[chosen[fam]]
        for lab in dict.fromkeys(("sel-id-t0.5-Tfit", "sel-ts-t0.5-Tfit", chosen["selective-id"],
                                  chosen["selective-ts"])):
            if lab in cands:
                report_in[lab] = cands[lab]
        report_in.update(moon_in)
        report_in["sel-rate"] = RateSelective(cands[chosen["selective"]], ts_in)
        log("  in-domain: held-out evaluation")
        held = evaluate(report_in, src_held, {"held_out": held_n}, full=True, log=log)
        msp_t = msp_best_threshold(torch.tensor(sel_eval["msp"]["select"]["_hist"]))
        res["in_domain"] = {"chosen": chosen, "select": _strip(sel_eval), "held_out": _strip(held),
                            "msp_threshold": msp_t,
                            "fit_time": {k[len("indomain-"):]: v for k, v in fits.times.items()
                                         if k.startswith("indomain-")},
                            "params": _params(report_in)}
        res["in_domain"]["msp_acc_held_out"] = msp_accuracy(torch.tensor(held["msp"]["held_out"]["_hist"]), msp_t)

        # ---------------- protocol 2: shift (fit on all of val with the chosen hyperparameters)
        log("  shift: fitting on all of val")
        src_val = Source(vstore, vnames, val_img)
        kwmap = {lab: kw for grid in specs.values() for lab, kw in grid}
        shift: dict[str, Any] = {"uncal": None}
        for fam in specs:
            lab = chosen[fam]
            name = lab.split("-")[0]
            shift[fam] = fits.fit(f"shift-{lab}", lambda n=name, k=kwmap[lab]: get_calibrator(n, **k),
                                  src_val.fit_source(with_images=(name == "lts")))
        skw = dict(sgrid)
        for key in ("sel-id-t0.5-Tfit", "sel-ts-t0.5-Tfit", chosen["selective"], chosen["selective-id"],
                    chosen["selective-ts"]):
            if key in skw and key not in shift:
                k = skw[key]
                shift[key] = fits.fit(f"shift-{key}", lambda k=k: make_selective(k["base"], k["t_mis"],
                                                                                  k["threshold"], epochs),
                                      src_val.fit_source())
        csrc_all = [Source(cs, cs.names) for cs in cstores]
        if csrc_all:
            shift["sel-corrupt"] = fits.fit("shift-sel-corrupt", lambda k=ckw: make_selective(
                k["base"], k["t_mis"], k["threshold"], epochs), src_val.union(*csrc_all))
            kid = skw[chosen["selective-id"]]
            shift["sel-id-corrupt"] = fits.fit("shift-sel-id-corrupt", lambda k=kid: make_selective(
                None, k["t_mis"], k["threshold"], epochs), src_val.union(*csrc_all))
            shift["ts-corrupt"] = fits.fit("shift-ts-corrupt", lambda: get_calibrator("ts"),
                                           src_val.union(*csrc_all))
        shift["sel-rate"] = RateSelective(shift[chosen["selective"]], shift["ts"])
        log(f"  shift: evaluating on test ({len(tnames)} images, stride {stride})")
        test_eval = evaluate(shift, Source(tstore, tnames, test_img), groups, full=True, log=log)
        # the shift-protocol detector on val itself (in-sample) for the why-analysis
        sel_only = {k: v for k, v in shift.items() if _is_selective(v) or k in ("uncal", "ts")}
        val_eval = evaluate(sel_only, Source(vstore, vnames, val_img), {"val": vnames}, full=False, log=log)
        msp_t_val = msp_best_threshold(torch.tensor(val_eval["msp"]["val"]["_hist"]))
        res["shift"] = {"test": _strip(test_eval), "val_in_sample": _strip(val_eval), "msp_threshold": msp_t_val,
                        "msp_acc": {g: msp_accuracy(torch.tensor(test_eval["msp"][g]["_hist"]), msp_t_val)
                                    for g in test_eval["msp"]},
                        "fit_time": {k[len("shift-"):]: v for k, v in fits.times.items() if k.startswith("shift-")},
                        "params": _params(shift)}
        # diagnostic only (never used for any choice): the TS temperature that would be optimal on each test group
        res["shift"]["oracle_T_test"] = {
            g: float(TemperatureScaling().fit(Source(tstore, ns).fit_source()).temperature_)
            for g, ns in groups.items()}
        log(f"  oracle TS temperature on test (diagnostic): {res['shift']['oracle_T_test']}")
        results["protocols"][model_name] = res
        (out / f"results-{model_name}.json").write_text(json.dumps(to_jsonable(results), indent=1))
        log(f"  done {model_name}")

    allres: dict[str, Any] = {"protocols": {}}
    for f in sorted(out.glob("results-*.json")):
        allres["protocols"].update(json.loads(f.read_text())["protocols"])
    (out / "results.json").write_text(json.dumps(allres, indent=1))
    md = tables(allres)
    (out / "tables.md").write_text(md)
    print(md)
    return 0


def _strip(ev: dict) -> dict:
    return {m: {g: {k: v for k, v in r.items() if not k.startswith("_")} for g, r in gs.items()}
            for m, gs in ev.items()}


def _params(methods: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, m in methods.items():
        if isinstance(m, RateSelective):
            m = m.sel
        if m is None:
            continue
        p: dict[str, Any] = {}
        if hasattr(m, "temperature_"):
            p["T"] = float(m.temperature_)
        if isinstance(m, SelectiveScaling):
            p.update(T_mis=float(m.temperature_mis_), threshold=m.threshold, best_epoch=m.best_epoch_,
                     base_T=float(m.base_.temperature_) if m.base_ is not None else None)
        if hasattr(m, "weights_"):
            p["weights"] = [float(w) for w in m.weights_]
        out[k] = p
    return out


# ---------------------------------------------------------------------------------------------------- tables
def _f(v: Any, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}"


def tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    hdr = ("| method | ECE | ECE10 | MCE | ACE | CW-ECE | NLL | Brier | mIoU | bnd ECE | int ECE | ECE corr | ECE mis "
           "| fit s |")
    sep = "|" + "---|" * 14

    def row(name: str, r: dict, t: float | None) -> str:
        vals = [_f(r.get(k)) for k in ("ece", "ece10", "mce", "ace", "cw_ece", "nll", "brier")]
        vals += [_f(100 * r["miou"], 2) if "miou" in r else "–", _f(r.get("boundary_ece")),
                 _f(r.get("interior_ece")), _f(r.get("ece_correct")), _f(r.get("ece_mis")),
                 _f(t, 1) if t is not None else "–"]
        return f"| {name} | " + " | ".join(vals) + " |"

    for model, res in results["protocols"].items():
        ind = res["in_domain"]
        lines += [f"\n### {model} — in-domain (fit {len(res['split']['fit'])} / select {len(res['split']['select'])}"
                  f" / held-out {len(res['split']['held_out'])} val images)\n", hdr, sep]
        ch = ind["chosen"]
        for name, r in ind["held_out"].items():
            if name == "msp":
                continue
            lab = ch.get(name, name)
            t = ind["fit_time"].get(lab) if name != "uncal" else None
            star = " ★" if name == ch.get("selective") else ""
            lines.append(row(f"{name}{f' ({lab})' if lab != name else ''}{star}", r["held_out"], t))
        lines += ["", "Selective detector on held-out (flag = p_mis > τ): ", "",
                  "| method | flag rate | error rate | recall | precision | det. acc | AUROC | AP | T_mis | base T |",
                  "|" + "---|" * 10]
        for name, r in ind["held_out"].items():
            rr = r["held_out"]
            if "flag_rate" in rr:
                p = ind["params"].get(name, {})
                lines.append(f"| {name} | {_f(rr['flag_rate'])} | {_f(rr['error_rate'])} | {_f(rr['recall'])} | "
                             f"{_f(rr['precision'])} | {_f(rr['det_accuracy'])} | {_f(rr.get('auroc'))} | "
                             f"{_f(rr.get('ap'))} | {_f(p.get('T_mis'), 3)} | {_f(p.get('base_T'), 3)} |")
        m = ind["held_out"]["msp"]["held_out"]
        lines.append(f"| MSP (uncal) | – | – | – | – | {_f(ind['msp_acc_held_out'])} (t={ind['msp_threshold']:.3f} "
                     f"from select) | {_f(m.get('auroc'))} | {_f(m.get('ap'))} | – | – |")
        sh = res["shift"]
        for g in [*(x for x in ("all", *SEQS) if x in next(iter(sh["test"].values())))]:
            lines += [f"\n### {model} — shift: fit on all val, test `{g}` ({res['test_images']} test images total)\n",
                      hdr, sep]
            for name, r in sh["test"].items():
                if name == "msp":
                    continue
                lab = ind["chosen"].get(name, name)
                lines.append(row(f"{name}{f' ({lab})' if lab != name else ''}", r[g], sh["fit_time"].get(lab)))
        lines += ["", f"#### {model} — why-analysis: Selective detectors, val (in-sample) vs test", "",
                  "| method | set | flag rate | error rate | recall | precision | det. acc | AUROC | "
                  "flagged conf/acc | unflagged conf/acc | T_mis | base T |", "|" + "---|" * 12]
        for name in sh["test"]:
            for setname, ev in (("val", sh["val_in_sample"]), *((g, sh["test"]) for g in ("all", *SEQS))):
                if name not in ev or setname not in ev[name]:
                    continue
                rr = ev[name][setname]
                if "flag_rate" not in rr:
                    continue
                p = sh["params"].get(name, {})
                lines.append(
                    f"| {name} | {setname} | {_f(rr['flag_rate'])} | {_f(rr['error_rate'])} | {_f(rr['recall'])} "
                    f"| {_f(rr['precision'])} | {_f(rr['det_accuracy'])} | {_f(rr.get('auroc'))} | "
                    f"{_f(rr['flagged_conf'], 3)}/{_f(rr['flagged_acc'], 3)} | "
                    f"{_f(rr['unflagged_conf'], 3)}/{_f(rr['unflagged_acc'], 3)} | {_f(p.get('T_mis'), 3)} | "
                    f"{_f(p.get('base_T'), 3)} |")
        for setname, ev in (("val", sh["val_in_sample"]), *((g, sh["test"]) for g in ("all", *SEQS))):
            if setname in ev["msp"]:
                rr = ev["msp"][setname]
                acc = sh["msp_acc"].get(setname)
                lines.append(f"| MSP (uncal) | {setname} | – | {_f(1 - rr['accuracy'])} | – | – | "
                             f"{_f(acc)} | {_f(rr.get('auroc'))} | – | – | – | – |")
        lines.append(f"\nMSP threshold (max accuracy on val): {sh['msp_threshold']:.3f}; "
                     f"uncalibrated mean confidence / accuracy per set: "
                     + ", ".join(f"{s}: {_f(sh['test']['uncal'][s]['mean_conf'], 3)}/"
                                 f"{_f(sh['test']['uncal'][s]['accuracy'], 3)}"
                                 for s in sh["test"]["uncal"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("SEGCAL_DATA", "/work/shared/data")
    sys.exit(main())
