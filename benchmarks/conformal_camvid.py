"""Conformal risk control on CamVid: does the guarantee hold, what does it cost, and where does it break (issue 11).

Usage:
    SEGCAL_DATA=/work/shared/data PYTHONPATH=src nice -n 5 .venv/bin/python benchmarks/conformal_camvid.py \\
        [--cache /work/cache] [--img docs/img] [--splits 200] [--aps] [--no-evaluate]

Protocol (thresholds on the 1001-point λ grid, i.e. ``refine=False``; the refined fit differs by < 0.001 in λ):

1. **val → test**: λ̂ calibrated on CamVid val (101 frames, all of sequence 0016E5), judged on CamVid test (233 frames)
   pooled and per sequence (``0001TP`` — dusk, ``Seq05VD`` — a sequence not in train/val). Val and test are *not*
   exchangeable (different sequences), so this is the realistic deployment case.
2. **re-splits** (the guarantee check): val ∪ test (334 frames) is shuffled ``--splits`` times into 101 calibration /
   233 test frames; a random split makes calibration and test exchangeable by construction, so the mean test risk
   over splits must be ≤ α.
3. **shift model**: the same for ``espnet-cityscapes`` (trained on Cityscapes, classes merged to CamVid's by its head,
   see ``segcal.models.CITYSCAPES_TO_CAMVID``): conformal calibration on CamVid val repairs a model that is off-domain
   only as far as test frames resemble val frames.

Controllers: image-level coverage (LAC sets, ε = 0.1: loss 1[more than 10 % of the image's valid pixels miss their
class]), the plain miss fraction (LAC), the FNR of ``Pedestrian`` masks (``count_empty=False``: only images that
contain pedestrians), and with ``--aps`` the coverage loss with APS sets. Per-image loss and set-size curves are
computed **once** per store (one pass for all controllers, cached in ``<cache>/conformal/curves``); every threshold
after that is a fixed-point sum over the chosen images (:func:`segcal.conformal.resplit_thresholds`).

Logits stores: ``<cache>/logits/<model>/<split>``, written with :func:`segcal.engine.predict` if missing.
Results: ``<cache>/conformal/results.json`` and Markdown tables (printed, and ``<cache>/conformal/tables.md``);
figures in ``--img``. With evaluation on (default), :func:`segcal.conformal.evaluate` is also run end to end for
the CamVid model at α = 0.1 (refined threshold, per-sequence subsets) and rendered by
:func:`segcal.report.conformal.section` into ``<cache>/conformal/section.html``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.conformal import (
    CoverageRiskControl,
    FNRControl,
    RiskControl,
    class_scores,
    clopper_pearson,
    evaluate,
    image_curves,
    resplit_thresholds,
    threshold_from_curves,
)
from segcal.data import CamVid, LogitsStore, sequence_of

MODELS = ("espnet-camvid", "espnet-cityscapes")
ALPHAS = (0.05, 0.1, 0.2)
SWEEP = tuple(round(0.01 * k, 2) for k in range(1, 31))
EPSILON = 0.1
FNR_CLASS = "Pedestrian"
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def get_store(model: str, split: str, cache: Path) -> LogitsStore:
    path = cache / "logits" / model / split
    expected = len(CamVid(split=split))
    try:
        store = LogitsStore(path)
        if len(store) == expected:
            return store
    except FileNotFoundError:
        pass
    from segcal import models
    from segcal.engine import predict

    log(f"predicting {model} on CamVid {split} -> {path}")
    return predict(models.load(model), CamVid(split=split), path, batch_size=4, progress=False)


def make_controllers(class_names: list[str], ignore_index: int | None, aps: bool) -> dict[str, RiskControl]:
    kw = {"ignore_index": ignore_index, "refine": False}
    out: dict[str, RiskControl] = {
        f"coverage LAC ε={EPSILON}": CoverageRiskControl(epsilon=EPSILON, **kw),
        "miss fraction LAC": CoverageRiskControl(loss="fraction", **kw),
        f"FNR {FNR_CLASS}": FNRControl(class_index=class_names.index(FNR_CLASS), count_empty=False, **kw),
    }
    if aps:
        out[f"coverage APS ε={EPSILON}"] = CoverageRiskControl(epsilon=EPSILON, score="aps", **kw)
    return out


def get_curves(model: str, split: str, store: LogitsStore, ctrls: dict[str, RiskControl], cache: Path
               ) -> dict[str, dict[str, Any]]:
    """Per-image curves of every controller on one store, cached (keyed by the controllers' settings)."""
    path = cache / "conformal" / "curves" / model / f"{split}.pt"
    key = {name: repr(c) for name, c in ctrls.items()}
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if all(saved["key"].get(n) == k for n, k in key.items()):
            return {n: saved["curves"][n] for n in ctrls}
        have = {n: saved["curves"][n] for n in saved["key"] if saved["key"][n] == key.get(n)}
    else:
        have = {}
    todo = {n: c for n, c in ctrls.items() if n not in have}
    log(f"curves {model}/{split}: {len(store)} images, {len(todo)} controllers (one pass)")
    t = time.time()
    cur = image_curves(list(todo.values()), lambda: store.batches(batch_size=4))
    log(f"  {time.time() - t:.0f}s")
    have.update(dict(zip(todo, cur, strict=True)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": {n: repr(ctrls[n]) if n in ctrls else "" for n in have}, "curves": have}, path)
    return {n: have[n] for n in ctrls}


def risk_stats(losses: torch.Tensor, alpha: float) -> dict[str, Any]:
    n = losses.numel()
    risk = float(losses.mean()) if n else math.nan
    if n and bool(((losses == 0) | (losses == 1)).all()):
        lo, hi = clopper_pearson(int(losses.sum()), n)
    elif n > 1:
        half = 1.96 * float(losses.std()) / math.sqrt(n)
        lo, hi = risk - half, risk + half
    else:
        lo = hi = math.nan
    return {"n": n, "risk": risk, "ci": [lo, hi], "meets": risk <= alpha}


def at(grid: torch.Tensor, lam: float) -> int:
    return int(torch.searchsorted(grid, torch.tensor([lam], dtype=torch.float64))[0])


def analyse(val: dict[str, Any], test: dict[str, Any], alphas: tuple[float, ...], n_splits: int, seed: int
            ) -> dict[str, Any]:
    grid = val["grid"]
    seqs = sorted({sequence_of(n) for n in test["names"]})
    groups = {"test": torch.ones(len(test["names"]), dtype=torch.bool)}
    for s in seqs:
        groups[s] = torch.tensor([sequence_of(n) == s for n in test["names"]])
    out: dict[str, Any] = {"val_to_test": {}, "resplits": {}, "sweep": {}}
    for a in (*alphas, *SWEEP):
        lam = threshold_from_curves(val["losses"], grid, a, counted=val["counted"])
        j = at(grid, lam)
        row = {"threshold": lam, "cal_set_size": float(val["set_sizes"][:, j].sum() / val["valid_pixels"].sum())}
        for g, sel in groups.items():
            m = sel & test["counted"]
            r = risk_stats(test["losses"][m, j], a)
            r["set_size"] = float(test["set_sizes"][sel, j].sum() / test["valid_pixels"][sel].sum())
            row[g] = r
        if a in alphas:
            out["val_to_test"][str(a)] = row
        if a in SWEEP:
            out["sweep"][str(a)] = {g: row[g]["risk"] for g in groups}
    # re-splits of the pooled images
    losses = torch.cat([val["losses"], test["losses"]])
    sizes = torch.cat([val["set_sizes"], test["set_sizes"]]).double()
    valid = torch.cat([val["valid_pixels"], test["valid_pixels"]]).double()
    counted = torch.cat([val["counted"], test["counted"]])
    n, n_cal = losses.shape[0], len(val["names"])
    gen = torch.Generator().manual_seed(seed)
    cal = torch.zeros(n_splits, n, dtype=torch.bool)
    for s in range(n_splits):
        cal[s, torch.randperm(n, generator=gen)[:n_cal]] = True
    held = (~cal & counted[None]).double()
    pooled_seq = [sequence_of(x) for x in (*val["names"], *test["names"])]
    seq_masks = {q: torch.tensor([p == q for p in pooled_seq]) for q in sorted(set(pooled_seq))}
    for a in (*alphas, *SWEEP):
        lam = resplit_thresholds(losses, grid, a, cal, counted=counted)
        j = torch.searchsorted(grid, lam)
        risk = (losses.T[j] * held).sum(1) / held.sum(1)
        size = (sizes.T[j] * (~cal).double()).sum(1) / ((~cal).double() * valid[None]).sum(1)
        if a in alphas:
            out["resplits"][str(a)] = {"mean_risk": float(risk.mean()), "se": float(risk.std() / math.sqrt(n_splits)),
                                       "q05": float(risk.quantile(0.05)), "q95": float(risk.quantile(0.95)),
                                       "share_le_alpha": float((risk <= a).double().mean()),
                                       "mean_set_size": float(size.mean()), "mean_threshold": float(lam.mean()),
                                       "per_sequence": {}, "risks": risk.tolist()}
            for q, m in seq_masks.items():  # marginal, not conditional: the held-out risk of one sequence's images
                h = held * m[None].double()
                keep = h.sum(1) > 0
                out["resplits"][str(a)]["per_sequence"][q] = float(((losses.T[j] * h).sum(1)[keep]
                                                                      / h.sum(1)[keep]).mean())
        if a in SWEEP:
            out["sweep"][str(a)]["resplit_mean"] = float(risk.mean())
    return out


def tables(results: dict[str, Any], alphas: tuple[float, ...]) -> str:
    lines = []
    for model, per in results["models"].items():
        seqs = [g for g in next(iter(next(iter(per.values()))["val_to_test"].values())) if g not in
                ("threshold", "cal_set_size", "test")]
        lines += [f"\n### {model}\n",
                  "| controller | α | λ̂ (val) | test risk [95 % CI] | " + " | ".join(f"{s} risk" for s in seqs)
                  + " | set size test | re-splits: mean risk ± SE | re-splits: 5–95 % | share ≤ α | set size |",
                  "|---|---|---|---|" + "---|" * len(seqs) + "---|---|---|---|---|"]
        for cname, res in per.items():
            for a in alphas:
                v = res["val_to_test"][str(a)]
                r = res["resplits"][str(a)]
                t = v["test"]
                flag = "" if t["meets"] else " ✗"
                seq_cells = " | ".join(f"{v[s]['risk']:.3f}{'' if v[s]['meets'] else ' ✗'} (n={v[s]['n']})"
                                       for s in seqs)
                lines.append(f"| {cname} | {a} | {v['threshold']:.3f} | {t['risk']:.3f}{flag} "
                             f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] (n={t['n']}) | {seq_cells} | {t['set_size']:.2f} | "
                             f"{r['mean_risk']:.3f} ± {r['se']:.3f} | {r['q05']:.3f}–{r['q95']:.3f} | "
                             f"{r['share_le_alpha']:.2f} | {r['mean_set_size']:.2f} |")
        seqs_all = list(next(iter(per.values()))["resplits"][str(alphas[0])]["per_sequence"])
        lines += ["", f"Random re-splits of val ∪ test, mean held-out risk per sequence ({model}):", "",
                  "| controller | α | " + " | ".join(seqs_all) + " | all |", "|---|---|" + "---|" * (len(seqs_all) + 1)]
        for cname, res in per.items():
            for a in alphas:
                r = res["resplits"][str(a)]
                lines.append(f"| {cname} | {a} | " + " | ".join(f"{r['per_sequence'][q]:.3f}" for q in seqs_all)
                             + f" | {r['mean_risk']:.3f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], img: Path, examples: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    models = list(results["models"])
    cname = f"coverage LAC ε={EPSILON}"
    # 1. risk vs alpha
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sw = results["models"][model][cname]["sweep"]
        keys = sorted(sw, key=float)
        a = [float(k) for k in keys]
        for g, style in (("test", "-o"), ("0001TP", "--"), ("Seq05VD", "--"), ("resplit_mean", "-s")):
            label = {"test": "val → test", "resplit_mean": "random re-splits (mean)"}.get(g, f"val → {g}")
            ax.plot(a, [sw[k][g] for k in keys], style, ms=3, label=label)
        ax.plot([0, 0.3], [0, 0.3], "k:", label="risk = α (guarantee)")
        ax.set_xlabel("α (target share of images with > 10 % pixels uncovered)")
        ax.set_ylabel("observed share on held-out images")
        ax.set_title(model)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img / "conformal_risk_vs_alpha.png", dpi=110)
    plt.close(fig)
    # 2. re-split distributions at alpha = 0.1
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for c, res in results["models"][model].items():
            ax.hist(res["resplits"]["0.1"]["risks"], bins=25, histtype="step", label=c)
        ax.axvline(0.1, color="k", ls=":", label="α = 0.1")
        ax.set_xlabel("test risk of one random split")
        ax.set_title(f"{model}: {results['n_splits']} re-splits of val ∪ test")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "conformal_resplits.png", dpi=110)
    plt.close(fig)
    # 3. set-size maps and uncovered pixels (no dataset image is drawn: only model-derived maps)
    if examples:
        fig, axes = plt.subplots(2, len(examples), figsize=(4.2 * len(examples), 6.0), squeeze=False)
        for k, (name, ex) in enumerate(examples.items()):
            vmax = max(3, int(ex["set_size"].max()))
            im = axes[0, k].imshow(ex["set_size"], cmap=plt.get_cmap("viridis", vmax + 1), vmin=-0.5,
                                   vmax=vmax + 0.5, interpolation="nearest")
            axes[0, k].set_title(f"{name.replace(':', ': ')}\nset size, α=0.1 (λ̂={ex['threshold']:.3f})", fontsize=8)
            fig.colorbar(im, ax=axes[0, k], fraction=0.035)
            status = np.where(ex["valid"], np.where(ex["uncovered"], 2, 1), 0)
            axes[1, k].imshow(status, cmap=matplotlib.colors.ListedColormap(["0.75", "white", "crimson"]), vmin=0,
                              vmax=2, interpolation="nearest")
            axes[1, k].set_title(f"red: true class not in the set ({100 * ex['miss']:.1f} % of valid pixels);"
                                 "\ngrey: void", fontsize=8)
            for ax in axes[:, k]:
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(img / "conformal_set_size.png", dpi=90)
        plt.close(fig)


def set_size_examples(model: str, store: LogitsStore, lam: float, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        e = store.get(name)
        s = class_scores(torch.softmax(e.logits.double()[None], 1))[0]
        sets = s <= lam
        valid = e.target != store.ignore_index
        tgt = torch.where(valid, e.target, 0)
        uncovered = (~sets.gather(0, tgt[None])[0]) & valid
        out[name] = {"model": model, "set_size": sets.sum(0).numpy(), "valid": valid.numpy(),
                     "uncovered": uncovered.numpy(), "threshold": lam,
                     "miss": float(uncovered.sum() / valid.sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/cache"))
    ap.add_argument("--img", type=Path, default=Path("docs/img"))
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--aps", action="store_true", help="also the coverage loss with APS sets (slower pass)")
    ap.add_argument("--no-evaluate", action="store_true", help="skip the end-to-end evaluate() run")
    ap.add_argument("--evaluate-only", action="store_true", help="only the end-to-end evaluate() run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        run_evaluate(args.cache, args.cache / "conformal")
        return
    results: dict[str, Any] = {"alphas": list(ALPHAS), "epsilon": EPSILON, "n_splits": args.splits,
                               "command": " ".join(["python", *sys.argv]), "models": {}}
    examples: dict[str, Any] = {}
    for model in args.models.split(","):
        val_store, test_store = get_store(model, "val", args.cache), get_store(model, "test", args.cache)
        ctrls = make_controllers(list(val_store.class_names), val_store.ignore_index, args.aps)
        cv = get_curves(model, "val", val_store, ctrls, args.cache)
        ct = get_curves(model, "test", test_store, ctrls, args.cache)
        results["models"][model] = {c: analyse(cv[c], ct[c], ALPHAS, args.splits, seed=0) for c in ctrls}
        lam = results["models"][model][f"coverage LAC ε={EPSILON}"]["val_to_test"]["0.1"]["threshold"]
        names = test_store.names
        picks = [next(n for n in names if sequence_of(n) == s) for s in ("0001TP", "Seq05VD")]
        examples.update({f"{model}:{n}": v for n, v in set_size_examples(model, test_store, lam, picks).items()})
    out = args.cache / "conformal"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = tables(results, ALPHAS)
    (out / "tables.md").write_text(md)
    print(md)
    plot(results, args.img, examples)
    log(f"figures in {args.img}")
    if not args.no_evaluate:
        run_evaluate(args.cache, out)


def run_evaluate(cache: Path, out: Path) -> None:
    """:func:`segcal.conformal.evaluate` end to end (refined fit on val, test with per-sequence subsets), cached."""
    from segcal.report.conformal import section

    path = out / "evaluate.json"
    if path.exists():
        res = json.loads(path.read_text())
        log(f"evaluate(): cached {path}")
    else:
        model = MODELS[0]
        val_store, test_store = get_store(model, "val", cache), get_store(model, "test", cache)
        seqs: dict[str, list[str]] = {}
        for n in test_store.names:
            seqs.setdefault(sequence_of(n), []).append(n)
        t = time.time()
        res = evaluate(CoverageRiskControl(alpha=0.1, epsilon=EPSILON, ignore_index=val_store.ignore_index),
                       val_store, {"test": test_store}, subsets=seqs)
        res["model"] = model
        log(f"evaluate() end to end (refined fit on val + one test pass): {time.time() - t:.0f}s")
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
    log(f"  λ̂ = {res['threshold']:.5f}, bound {res['risk_bound']:.4f}, test risk {res['splits']['test']['risk']:.3f}")
    (out / "section.html").write_text(f"<!doctype html><meta charset=utf-8><body>{section({'conformal': res})}"
                                      "</body>")

if __name__ == "__main__":
    main()
