"""A calibrator's fit cost against TS on the same data, and what a budget costs in quality (issue 14 item 3).

A configuration of ``segcal.engine.protocol``: TS and variants of one calibrator (the kwargs given) are fitted on all
of a split (the logits store of the run's cache; images decoded from the data set, as the benchmark does), then all
are evaluated on another split with the library's metric suite. Printed: fit seconds, fit time / TS fit time, ECE /
NLL / ACE / boundary ECE on the evaluation split.

Usage (run it with the code version to measure on ``PYTHONPATH``):
    SEGCAL_DATA=/work/shared/data PYTHONPATH=src .venv/bin/python benchmarks/calibrator_budget.py \\
        --cache /work/cache/full_r3 [--method lts] [--variants "" "seed=1" "max_crops=128,epochs=5"] \\
        [--threads 2] [--test-stride 1]
"""

from __future__ import annotations

import argparse
import ast
import os
import time
from pathlib import Path

import torch

from segcal.engine.protocol import (
    BenchmarkConfig,
    cached_store,
    evaluate_calibrators_on_sets,
    fit_calibrators,
    load_model,
    make_dataset,
)


def _kwargs(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--data", default="camvid")
    ap.add_argument("--model", default="espnet-camvid")
    ap.add_argument("--fit-split", default="val")
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--test-stride", type=int, default=1, help="evaluate every k-th image of the eval split")
    ap.add_argument("--method", default="lts", help="registry name of the calibrator to compare with TS")
    ap.add_argument("--variants", nargs="*", default=[""], help="kwargs per variant, e.g. 'max_crops=128,epochs=5'")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    cache = Path(args.cache)
    cfg = BenchmarkConfig(out=cache / "calibrator_budget", data=args.data, model=args.model, cache=cache,
                          progress=False, bootstrap_resamples=0)
    model = load_model(cfg, args.model)
    fit_ds, eval_ds = make_dataset(cfg, args.fit_split), make_dataset(cfg, args.eval_split)
    fit_store = cached_store(model, args.model, fit_ds, args.fit_split, cfg)
    eval_store = cached_store(model, args.model, eval_ds, args.eval_split, cfg)
    fitted, times = fit_calibrators(["ts"], fit_store, fit_ds, cfg)
    for text in args.variants:
        cfg.method_kwargs = {args.method: _kwargs(text)}
        cal, t = fit_calibrators([args.method], fit_store, fit_ds, cfg)
        label = f"{args.method}[{text or 'defaults'}]"
        fitted[label], times[label] = cal[args.method], t[args.method]
    names = list(eval_store.names)[::args.test_stride]
    start = time.perf_counter()
    results, _ = evaluate_calibrators_on_sets(eval_store, eval_ds, fitted, cfg, {"eval": names})
    print(f"evaluated {len(names)} {args.eval_split} images in {time.perf_counter() - start:.0f} s")
    print(f"load average after: {os.getloadavg()}")
    print(f"fit on {len(fit_store.names)} {args.fit_split} images, {args.threads} threads\n")
    print("| method | fit s | × TS fit | iterations | ECE % | NLL | ACE % | boundary ECE % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in results["eval"].items():
        fit = times.get(m)
        n_iter = getattr(fitted.get(m), "n_iter_", None)
        cells = [f"{fit:.1f}" if fit else "-", f"{fit / times['ts']:.2f}" if fit else "-",
                 "-" if n_iter is None else str(n_iter),
                 f"{100 * r['ece']:.2f}", f"{r['nll']:.4f}", f"{100 * r['ace']:.2f}",
                 f"{100 * r['boundary_ece']:.2f}" if r.get("boundary_ece") is not None else "-"]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
