"""Error (IDM) and OOD detection on real data: every segcal detector on CamVid with the published ESPNet weights.

Protocols (deterministic; every random choice is seeded):

1. **IDM on CamVid test** — positive = ``ŷ ≠ y`` on valid (non-void) pixels; AUROC / AP / FPR95 per image then
   averaged, and pooled over all pixels; also per sequence (0001TP = dusk, Seq05VD = unseen).
2. **Pasted anomalies** (Fishyscapes-Static style) on CamVid test frames (``PastedAnomalyDataset``, seed 0): positive
   = pasted pixels, negatives = valid in-distribution pixels; pooled OOD AUROC / AP / FPR95.
3. **Domain shift** — ``--shift-frames`` evenly spaced test frames under corruptions at severities 1–5: ECE (15 bins)
   and IDM AUROC per corruption and severity; plus the Cityscapes model → CamVid case (its logits are CamVid
   log-probabilities; SML / FlowEneDet / Selective re-fitted on its own CamVid-val logits).

Detectors: msp, max_logit, entropy, energy, sml (statistics from the train store), flowenedet-u / flowenedet-c (fit on
val, never test; SML statistics from train), selective (``SelectiveScaling`` fitted on val). Extra FlowEneDet rows
(``--fed-variants``) probe the method: void handling, more epochs, fit on train, and the optional ``energy+msp``
input extension (not the paper's method). Speed: FlowEneDet fit time; inference time vs the ESPNet forward at 1 and 2
threads (median of ``--repeats`` interleaved runs).

Resumable: logits stores resume through ``segcal.engine.predict``, fitted detectors are saved under
``OUT/detectors``, finished sections are kept in ``OUT/results.json`` (``--force SECTION`` redoes one).

Usage::

    SEGCAL_DATA=/work/shared/data nice -n 5 .venv/bin/python benchmarks/detection_camvid.py --quick
    SEGCAL_DATA=/work/shared/data nice -n 5 .venv/bin/python benchmarks/detection_camvid.py      # full run
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segcal import models
from segcal.calibrators import SelectiveScaling
from segcal.data import CamVid, LogitsStore, sequence_of
from segcal.data.anomalies import OOD_LABEL, PastedAnomalyDataset
from segcal.data.corruptions import CorruptedDataset
from segcal.detectors import FlowEneDet, StandardizedMaxLogit, fit_sml_statistics, get_detector
from segcal.detectors.sml import SMLStatistics
from segcal.engine import predict
from segcal.metrics import CalibrationMetrics, DetectionMetrics

BASELINES = ("msp", "max_logit", "entropy", "energy", "sml", "selective")
IGNORE = 255
# name -> FlowEneDet kwargs (+ "train_on": "val" | "train", "batch": images per optimiser step, default 8).
# The first two are the library defaults (whole maps, batch 8, 4 epochs: ~52 optimiser steps on CamVid val, barely
# past the 50-step warm-up). "/long" = the same method with a longer schedule: 2 images per step, 4 random 128×128
# crops each, 12 epochs (~600 steps). "+msp" = the optional energy+msp input extension (not the paper's method).
LONG = {"batch": 2, "patch_size": 128, "patches_per_image": 4, "epochs": 12}
FED_CONFIGS: dict[str, dict[str, Any]] = {
    "flowenedet-u": {"variant": "u"},
    "flowenedet-c": {"variant": "c"},
    "fed-u/long": {"variant": "u", **LONG},
    "fed-c/long": {"variant": "c", **LONG},
    "fed-u/long/no-void": {"variant": "u", "void_as_ood": False, **LONG},
    "fed-u/long/train": {"variant": "u", "train_on": "train", **LONG, "epochs": 4},
    "fed-u+msp/long": {"variant": "u", "inputs": "energy+msp", **LONG},
    "fed-c+msp/long": {"variant": "c", "inputs": "energy+msp", **LONG},
}
# detectors scored under corruptions (the rest are ablations of the clean protocol)
SHIFT_DETS = ("msp", "max_logit", "entropy", "energy", "sml", "selective", "flowenedet-u", "flowenedet-c",
              "fed-u/long", "fed-c/long", "fed-u+msp/long")
SHIFT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression")


class Subset(Sequence):
    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def evenly(n: int, k: int | None) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def writer_running(path: Path) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return any("predict" in line and str(path) in line and "detection_camvid" not in line
               for line in out.splitlines())


def ensure_store(model: Any, dataset: Any, path: Path) -> LogitsStore:
    """Open a finished store, or create / resume it (waiting while another ``segcal predict`` writes it)."""
    if path.exists():
        try:
            store = LogitsStore(path)
            if len(store) >= len(dataset) and store.has_features:
                return store
        except (ValueError, OSError):
            pass
    while writer_running(path):
        print(f"waiting: another process writes {path}", flush=True)
        time.sleep(30)
    return predict(model, dataset, path, features=True, progress=False)


def fmt(x: float) -> str:
    return "nan" if x != x else f"{100 * x:.1f}"


class Results:
    def __init__(self, path: Path, force: Sequence[str]) -> None:
        self.path, self.force = path, set(force)
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def done(self, key: str) -> bool:
        return key in self.data and key not in self.force

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


# ---------------------------------------------------------------------------------------------------- detectors
def fit_detectors(prefix: str, train: LogitsStore, val: LogitsStore, outdir: Path, fed_names: Sequence[str],
                  epochs: int, log: dict[str, Any]) -> dict[str, Any]:
    """Fit (or reload) every detector for one model. ``log`` collects fit times (seconds)."""
    outdir.mkdir(parents=True, exist_ok=True)
    dets: dict[str, Any] = {n: get_detector(n) for n in ("msp", "max_logit", "entropy", "energy")}
    sml_path = outdir / f"{prefix}sml-stats.pt"
    if sml_path.exists():
        stats = SMLStatistics.from_dict(torch.load(sml_path, weights_only=True))
    else:
        t0 = time.perf_counter()
        stats = fit_sml_statistics(train, IGNORE)
        log[f"{prefix}sml_fit_s"] = time.perf_counter() - t0
        torch.save(stats.to_dict(), sml_path)
    dets["sml"] = StandardizedMaxLogit(stats.class_mean_, stats.class_std_)
    sel_path = outdir / f"{prefix}selective.pt"
    if sel_path.exists():
        cal = SelectiveScaling.load(sel_path)
    else:
        t0 = time.perf_counter()
        cal = SelectiveScaling().fit(val)
        log[f"{prefix}selective_fit_s"] = time.perf_counter() - t0
        cal.save(sel_path)
    dets["selective"] = get_detector("selective", calibrator=cal)
    for name in fed_names:
        cfg = dict(FED_CONFIGS[name])
        store = train if cfg.pop("train_on", "val") == "train" else val
        bs = cfg.pop("batch", 8)
        source = functools.partial(store.batches, bs, features=True)
        cfg.setdefault("epochs", epochs)
        path = outdir / f"{prefix}{name.replace('/', '_')}.pt"
        if path.exists():
            dets[name] = FlowEneDet.load(path)
            continue
        t0 = time.perf_counter()
        det = FlowEneDet(seed=0, sml=stats, **cfg).fit(source)
        log[f"{prefix}{name}_fit_s"] = time.perf_counter() - t0
        log[f"{prefix}{name}_loss"] = det.history_
        print(f"fitted {prefix}{name} in {time.perf_counter() - t0:.0f}s, loss {det.history_}", flush=True)
        det.save(path)
        dets[name] = det
    return dets


def run_scores(dets: dict[str, Any], logits: torch.Tensor, feats: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {n: d.score(logits, feats) for n, d in dets.items()}


def metric_dict(m: DetectionMetrics) -> dict[str, float]:
    return {k: float(v) for k, v in m.compute().items()}


# ---------------------------------------------------------------------------------------------------- protocols
def idm(store: LogitsStore, dets: dict[str, Any], names: Sequence[str] | None = None, by_sequence: bool = True,
        calibration: bool = False) -> dict[str, Any]:
    """IDM metrics per detector (all images, and per sequence); optionally the model's ECE / mIoU."""
    groups: dict[str, dict[str, DetectionMetrics]] = {}
    cal = CalibrationMetrics(store.num_classes, classwise=False) if calibration else None
    for b in store.batches(4, features=True, names=names):
        logits, target, feats = b["logits"], b["target"], b["features"]
        valid = target != IGNORE
        pos = (logits.argmax(1) != target) & valid
        scores = run_scores(dets, logits, feats)
        if cal is not None:
            cal.update(logits, target)
        keys = [["all", sequence_of(n)] if by_sequence else ["all"] for n in b["names"]]
        for i, ks in enumerate(keys):
            for k in ks:
                g = groups.setdefault(k, {n: DetectionMetrics(per_image=True) for n in dets})
                for n, s in scores.items():
                    g[n].update(s[i : i + 1], pos[i : i + 1], valid[i : i + 1])
    out: dict[str, Any] = {k: {n: metric_dict(m) for n, m in g.items()} for k, g in groups.items()}
    if cal is not None:
        c = cal.compute()
        out["calibration"] = {"ece": float(c["ece"]), "miou": float(c["miou"]), "accuracy": float(c["accuracy"])}
    return out


class StorableAnomalies(Sequence):
    """Pasted-anomaly frames with the OOD pixels written as void (a LogitsStore keeps labels in [0, C) ∪ {255});
    the OOD masks are re-generated deterministically from the dataset at evaluation time."""

    def __init__(self, dataset: PastedAnomalyDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = dict(self.dataset[i])
        t = s["target"].copy()
        t[s.pop("ood_mask")] = IGNORE
        s["target"] = t
        return s


def ood(store: LogitsStore, dataset: PastedAnomalyDataset, dets: dict[str, Any]) -> dict[str, Any]:
    """Pooled OOD metrics: positive = pasted pixels, negative = valid in-distribution pixels."""
    ms = {n: DetectionMetrics() for n in dets}
    for i in range(len(dataset)):
        s = dataset[i]
        e = store.get(s["name"])
        mask = torch.from_numpy(s["ood_mask"])[None]
        assert bool((torch.as_tensor(s["target"])[mask[0]] == OOD_LABEL).all())
        valid = (e.target[None] != IGNORE) | mask
        logits, feats = e.logits[None].float(), e.features[None].float()
        for n, sc in run_scores(dets, logits, feats).items():
            ms[n].update(sc, mask, valid)
    return {n: metric_dict(m) for n, m in ms.items()}


def speed(model: Any, dets: dict[str, Any], image: Any, repeats: int) -> dict[str, Any]:
    """Median wall time (ms) of the ESPNet forward (with features) and of each detector's score, interleaved."""
    out: dict[str, Any] = {}
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {"forward": []}
            logits, feats = model.predict_batch(image, features=True)
            for _ in range(repeats):
                t0 = time.perf_counter()
                logits, feats = model.predict_batch(image, features=True)
                times["forward"].append(time.perf_counter() - t0)
                for n, d in dets.items():
                    t0 = time.perf_counter()
                    d.score(logits, feats)
                    times.setdefault(n, []).append(time.perf_counter() - t0)
            med = {n: 1000 * statistics.median(v) for n, v in times.items()}
            out[f"{threads}t"] = {"ms": med, "overhead": {n: v / med["forward"] for n, v in med.items()}}
    finally:
        torch.set_num_threads(old)
    return out


# ---------------------------------------------------------------------------------------------------- report
def table(rows: dict[str, dict[str, float]], cols: Sequence[tuple[str, str]]) -> str:
    head = "| detector | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for n, r in rows.items():
        vals = []
        for _, k in cols:
            v = r.get(k, float("nan"))
            vals.append(fmt(v) if k.split("_")[0] in ("auroc", "ap", "fpr95", "ece", "miou") else f"{v:.2f}")
        lines.append(f"| {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report(res: dict[str, Any]) -> str:
    parts = []
    per_img = [("AUROC/img", "auroc_per_image"), ("AP/img", "ap_per_image"), ("FPR95/img", "fpr95_per_image"),
               ("AUROC", "auroc"), ("AP", "ap"), ("FPR95", "fpr95")]
    pooled = [("AUROC", "auroc"), ("AP", "ap"), ("FPR95", "fpr95")]
    if "idm_test" in res:
        for k, v in res["idm_test"].items():
            if k != "calibration":
                parts.append(f"### IDM, CamVid test — {k}\n\n" + table(v, per_img))
    if "ood_pasted" in res:
        parts.append("### OOD, pasted anomalies on CamVid test (pooled)\n\n" + table(res["ood_pasted"], pooled))
    if "shift" in res:
        sh = res["shift"]
        dets = list(sh["clean"]["all"].keys()) if "clean" in sh else []
        sevs = sorted({k.rsplit("-", 1)[1] for k in sh if k != "clean"})
        cors = sorted({k.rsplit("-", 1)[0] for k in sh if k != "clean"})
        lines = ["| corruption | sev | ECE | mIoU | " + " | ".join(dets) + " |", "|---" * (len(dets) + 4) + "|"]
        rows = [("clean", "0", sh["clean"])] if "clean" in sh else []
        rows += [(c, s, sh[f"{c}-{s}"]) for c in cors for s in sevs if f"{c}-{s}" in sh]
        for c, s, r in rows:
            lines.append(f"| {c} | {s} | {fmt(r['calibration']['ece'])} | {fmt(r['calibration']['miou'])} | "
                         + " | ".join(fmt(r["all"][d]["auroc_per_image"]) for d in dets) + " |")
        parts.append("### Domain shift: IDM AUROC per image (and the model's ECE / mIoU)\n\n" + "\n".join(lines))
    if "cityscapes" in res:
        for k, v in res["cityscapes"].items():
            if k != "calibration":
                parts.append(f"### Cityscapes model → CamVid test — {k}\n\n" + table(v, per_img))
    if "speed" in res:
        for t, v in res["speed"].items():
            lines = ["| | ms | × forward |", "|---|---|---|"]
            lines += [f"| {n} | {ms:.1f} | {100 * v['overhead'][n]:.1f} % |" for n, ms in v["ms"].items()]
            parts.append(f"### Inference time, {t} (median)\n\n" + "\n".join(lines))
    if "fit_log" in res:
        parts.append("### Fit log\n\n```\n" + json.dumps(res["fit_log"], indent=1) + "\n```")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="cache", help="holds logits/<model>/{train,val,test}")
    p.add_argument("--out", default="cache/detection")
    p.add_argument("--quick", action="store_true", help="smoke run: few frames, 1 epoch, 1 corruption")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-stride", type=int, default=3, help="use every k-th train frame (SML stats, fed-u/train)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--fed-variants", nargs="*", default=list(FED_CONFIGS))
    p.add_argument("--anomaly-frames", type=int, default=None, help="evenly spaced test frames (default all)")
    p.add_argument("--shift-frames", type=int, default=40)
    p.add_argument("--corruptions", nargs="*", default=list(SHIFT_CORRUPTIONS))
    p.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--cityscapes-frames", type=int, default=None, help="evenly spaced val/test frames (default all)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: idm ood shift cityscapes speed")
    p.add_argument("--force", nargs="*", default=[], help="sections to recompute")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = Path(a.out) / ("quick" if a.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.epochs, a.shift_frames, a.anomaly_frames, a.cityscapes_frames = 1, 4, 6, 6
        a.corruptions, a.severities, a.repeats = a.corruptions[:1], [3], 3
        a.fed_variants = [v for v in a.fed_variants if v in ("flowenedet-u", "flowenedet-c", "fed-u+msp/long")]
    res = Results(out / "results.json", a.force)
    stores = Path(a.cache) / "logits" / "espnet-camvid"
    own = out / "stores"
    model = models.load("espnet-camvid")
    test_ds = CamVid(split="test")
    if a.quick:
        qi = evenly(len(test_ds), 8)
        train = ensure_store(model, Subset(CamVid(split="train"), evenly(367, 12)), own / "train")
        val = ensure_store(model, Subset(CamVid(split="val"), evenly(101, 8)), own / "val")
        test = ensure_store(model, Subset(test_ds, qi), own / "test")
    else:
        # every 3rd training frame (123 of 367): the shared full train store was still being written (slowly, by a
        # low-priority job) when this benchmark ran; SML class statistics need far fewer pixels than that
        train_ds = CamVid(split="train")
        train = ensure_store(model, Subset(train_ds, range(0, len(train_ds), a.train_stride)),
                             Path(a.out) / "stores" / f"train-every{a.train_stride}")
        val = ensure_store(model, CamVid(split="val"), stores / "val")
        test = ensure_store(model, test_ds, stores / "test")
    fit_log: dict[str, Any] = dict(res.data.get("fit_log", {}))
    dets = fit_detectors("", train, val, out / "detectors", a.fed_variants, a.epochs, fit_log)
    res.put("fit_log", fit_log)
    res.put("config", {k: v for k, v in vars(a).items()})

    if "idm" not in a.skip and not res.done("idm_test"):
        t0 = time.perf_counter()
        res.put("idm_test", idm(test, dets, calibration=True))
        print(f"idm_test {time.perf_counter() - t0:.0f}s", flush=True)

    if "speed" not in a.skip and not res.done("speed"):
        image = test_ds[0]["image"][None]
        tdets = {n: dets[n] for n in ("msp", "energy", "sml", "selective", "flowenedet-u", "flowenedet-c",
                                      "fed-u+msp/long") if n in dets}
        res.put("speed", speed(model, tdets, image, a.repeats))

    if "ood" not in a.skip and not res.done("ood_pasted"):
        t0 = time.perf_counter()
        idx = evenly(len(test_ds), a.anomaly_frames)
        pasted = PastedAnomalyDataset(Subset(test_ds, idx), seed=0, n_objects=1)
        anom = ensure_store(model, StorableAnomalies(pasted), own / "anomaly")
        res.put("ood_pasted", ood(anom, pasted, dets))
        print(f"ood {time.perf_counter() - t0:.0f}s", flush=True)

    if "cityscapes" not in a.skip and not res.done("cityscapes"):
        t0 = time.perf_counter()
        cmodel = models.load("espnet-cityscapes")
        vi, ti = evenly(101, a.cityscapes_frames), evenly(len(test_ds), a.cityscapes_frames)
        cval = ensure_store(cmodel, Subset(CamVid(split="val"), vi), own / "cityscapes" / "val")
        ctest = ensure_store(cmodel, Subset(test_ds, ti), own / "cityscapes" / "test")
        # SML statistics, FlowEneDet and Selective fitted on the Cityscapes model's CamVid-val logits
        cnames = [n for n in ("flowenedet-u", "flowenedet-c", "fed-u/long", "fed-c/long", "fed-u+msp/long")
                  if n in a.fed_variants]
        cdets = fit_detectors("cityscapes-", cval, cval, out / "detectors", cnames, a.epochs, fit_log)
        res.put("fit_log", fit_log)
        res.put("cityscapes", idm(ctest, cdets, calibration=True))
        print(f"cityscapes {time.perf_counter() - t0:.0f}s", flush=True)

    if "shift" not in a.skip:
        idx = evenly(len(test_ds), a.shift_frames)
        shift = dict(res.data.get("shift", {})) if "shift" not in a.force else {}
        sdets = {n: d for n, d in dets.items() if n in SHIFT_DETS}
        clean_names = [test_ds.names[i] for i in idx]
        if "clean" not in shift:
            shift["clean"] = idm(test, sdets, names=[n for n in clean_names if n in test], by_sequence=False,
                                 calibration=True)
            res.put("shift", shift)
        for c in a.corruptions:
            for s in a.severities:
                key = f"{c}-{s}"
                if key in shift:
                    continue
                t0 = time.perf_counter()
                st = ensure_store(model, CorruptedDataset(Subset(test_ds, idx), c, s, seed=0),
                                  own / "shift" / key)
                shift[key] = idm(st, sdets, by_sequence=False, calibration=True)
                res.put("shift", shift)
                print(f"shift {key} {time.perf_counter() - t0:.0f}s", flush=True)

    text = report(res.data)
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
