"""Render a results folder (``results.json`` + example images) as one self-contained HTML page.

The page embeds every figure as a base64 PNG, so ``index.html`` can be mailed or archived on its own. Schema of
``results.json`` (written by :mod:`segcal.engine.benchmark`)::

    meta:        {model, dataset, command, segcal_version, ...}
    class_names: [...]
    calibration: {eval_set: {method: {ece, mce, ace, cw_ece, nll, brier, miou, ..., reliability: {...},
                                      per_class_ece: [...]}}}
    detection:   {protocol: {detector: {auroc, ap, fpr95, roc: [fpr, tpr], pr: [recall, precision]}}}
    shift:       {corruption: {severity: {metric: value}}}
    examples:    [{name, panels: {title: relative png path}}]
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segcal.report.displays import CurveDisplay, PerClassDisplay, ReliabilityDisplay, SeverityDisplay

LOWER_IS_BETTER = {"ece", "mce", "ace", "cw_ece", "nll", "brier", "oe", "image_ece", "boundary_ece",
                   "interior_ece", "fpr95", "fit_time_s", "ece_correct", "ece_wrong"}
HIGHER_IS_BETTER = {"auroc", "ap", "miou", "accuracy", "open_set_miou"}
CALIBRATION_COLUMNS = ("ece", "mce", "ace", "cw_ece", "nll", "brier", "oe", "image_ece", "boundary_ece",
                       "interior_ece", "accuracy", "miou", "fit_time_s")
DETECTION_COLUMNS = ("auroc", "ap", "fpr95", "auroc_per_image", "ap_per_image", "fpr95_per_image", "open_set_miou",
                     "closed_set_miou")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:24px} h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0 16px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
td.best{background:#d8f0d8;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:10px} .grid figure{margin:0}
figcaption{font-size:11.5px;color:#555;text-align:center}
img{max-width:100%} .meta{font-size:12px;color:#555} .note{font-size:12.5px;color:#444}
"""


def _fig_to_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_to_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "—"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return html.escape(str(value))


def metrics_table(rows: Mapping[str, Mapping[str, Any]], columns: tuple[str, ...]) -> str:
    """An HTML table with the best value of each column highlighted."""
    present = [c for c in columns if any(isinstance(r.get(c), int | float) for r in rows.values())]
    best: dict[str, float] = {}
    for c in present:
        vals = [r[c] for r in rows.values() if isinstance(r.get(c), int | float) and r[c] == r[c]]
        if not vals or len(rows) < 2:
            continue
        base = c.removesuffix("_per_image")
        if base in LOWER_IS_BETTER:
            best[c] = min(vals)
        elif base in HIGHER_IS_BETTER:
            best[c] = max(vals)
    out = ["<table><tr><th>method</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in present) + "</tr>"]
    for name, r in rows.items():
        cells = []
        for c in present:
            v = r.get(c)
            cls = ' class="best"' if c in best and isinstance(v, int | float) and v == best[c] else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        out.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(uri: str, caption: str, width: int = 380) -> str:
    return (f'<figure><img src="{uri}" width="{width}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _summary_section(results: Mapping[str, Any]) -> list[str]:
    """One line per table: who wins on the headline metric, and by how much against the baseline."""
    items = []
    for eval_set, methods in results.get("calibration", {}).items():
        scored = {m: r["ece"] for m, r in methods.items() if isinstance(r.get("ece"), int | float)}
        if len(scored) < 2:
            continue
        best = min(scored, key=scored.get)
        base = scored.get("uncalibrated")
        rel = f" ({scored[best] / base:.2f}× uncalibrated {base:.4f})" if base else ""
        items.append(f"<li><b>{html.escape(eval_set)}</b>: lowest ECE <b>{html.escape(best)}</b> "
                     f"{scored[best]:.4f}{rel}</li>")
    for protocol, detectors in results.get("detection", {}).items():
        au = {d: r["auroc"] for d, r in detectors.items() if isinstance(r.get("auroc"), int | float)}
        ap = {d: r["ap"] for d, r in detectors.items() if isinstance(r.get("ap"), int | float)}
        if len(au) < 2:
            continue
        b_au, b_ap = max(au, key=au.get), max(ap, key=ap.get)
        items.append(f"<li><b>{html.escape(protocol)}</b>: best AUROC <b>{html.escape(b_au)}</b> {au[b_au]:.4f}, "
                     f"best AP <b>{html.escape(b_ap)}</b> {ap[b_ap]:.4f}</li>")
    return ["<h2>Summary</h2>", "<ul>" + "".join(items) + "</ul>"] if items else []


def _calibration_section(results: Mapping[str, Any]) -> list[str]:
    parts = ["<h2>Calibration</h2>",
             '<p class="note">Lower is better for every error column; green = best in column.</p>']
    class_names = results.get("class_names") or []
    for eval_set, methods in results.get("calibration", {}).items():
        parts.append(f"<h3>{html.escape(eval_set)}</h3>")
        parts.append(metrics_table(methods, CALIBRATION_COLUMNS))
        figs = []
        for method, r in methods.items():
            if "reliability" in r:
                disp = ReliabilityDisplay.from_reliability(r["reliability"], label=f"{eval_set}: {method}")
                figs.append(_figure(_fig_to_data_uri(disp.figure_), f"reliability — {method}", 300))
        if figs:
            parts.append('<div class="grid">' + "".join(figs) + "</div>")
        per_class = {m: r["per_class_ece"] for m, r in methods.items() if "per_class_ece" in r}
        if per_class and class_names:
            disp = PerClassDisplay(per_class, class_names, title=f"per-class ECE — {eval_set}").plot()
            parts.append(_figure(_fig_to_data_uri(disp.figure_), "per-class ECE (one-vs-rest, 15 bins)", 760))
    return parts


def _detection_section(results: Mapping[str, Any]) -> list[str]:
    parts = ["<h2>Error and OOD detection</h2>",
             '<p class="note">Scores: higher = more likely an error / OOD pixel. AUROC, AP: higher is better; '
             "FPR95: lower is better.</p>"]
    for protocol, detectors in results.get("detection", {}).items():
        parts.append(f"<h3>{html.escape(protocol)}</h3>")
        parts.append(metrics_table(detectors, DETECTION_COLUMNS))
        roc = {d: tuple(r["roc"]) for d, r in detectors.items() if "roc" in r}
        pr = {d: tuple(r["pr"]) for d, r in detectors.items() if "pr" in r}
        figs = []
        if roc:
            disp = CurveDisplay(roc, "roc", f"ROC — {protocol}",
                                {d: r["auroc"] for d, r in detectors.items() if "auroc" in r}).plot()
            figs.append(_figure(_fig_to_data_uri(disp.figure_), "ROC (legend: AUROC)"))
        if pr:
            disp = CurveDisplay(pr, "pr", f"precision–recall — {protocol}",
                                {d: r["ap"] for d, r in detectors.items() if "ap" in r}).plot()
            figs.append(_figure(_fig_to_data_uri(disp.figure_), "precision–recall (legend: AP)"))
        if figs:
            parts.append('<div class="grid">' + "".join(figs) + "</div>")
    return parts


def _shift_section(results: Mapping[str, Any]) -> list[str]:
    """Severity curves: per metric family (ECE per calibrator, IDM AUROC per detector) averaged over corruptions,
    plus the uncalibrated ECE per corruption."""
    shift = results.get("shift") or {}
    if not shift:
        return []
    parts = ["<h2>Domain shift (corruption severity)</h2>",
             f'<p class="note">Corruptions: {html.escape(", ".join(shift))}; severity 0 = clean frames. '
             "Curves average over corruptions unless the legend names a corruption.</p>"]
    keys = sorted({k for by_sev in shift.values() for vals in by_sev.values() for k in vals})
    families: dict[str, list[str]] = {}
    for key in keys:
        family = key.rpartition(" ")[0] if " " in key else key
        families.setdefault(family, []).append(key)
    figs = []
    for family, members in families.items():
        series = {}
        for key in members:
            label = key[len(family):].strip() or key
            sevs = sorted({int(s) for by_sev in shift.values() for s in by_sev})
            series[label] = {s: float(np.mean([by_sev[str(s)][key] for by_sev in shift.values()
                                                if str(s) in by_sev and by_sev[str(s)].get(key) is not None]))
                             for s in sevs}
        disp = SeverityDisplay(series, family, f"{family} vs severity (mean over corruptions)").plot()
        figs.append(_figure(_fig_to_data_uri(disp.figure_), f"{family} vs corruption severity", 420))
    if "ECE uncalibrated" in keys:
        per_corruption = {c: {int(s): v["ECE uncalibrated"] for s, v in by_sev.items() if "ECE uncalibrated" in v}
                          for c, by_sev in shift.items()}
        disp = SeverityDisplay(per_corruption, "ECE (uncalibrated)", "uncalibrated ECE per corruption").plot()
        figs.append(_figure(_fig_to_data_uri(disp.figure_), "uncalibrated ECE per corruption", 420))
    parts.append('<div class="grid">' + "".join(figs) + "</div>")
    return parts


def _examples_section(results: Mapping[str, Any], root: Path) -> list[str]:
    examples = results.get("examples") or []
    if not examples:
        return []
    parts = ["<h2>Examples</h2>"]
    for ex in examples:
        parts.append(f"<h3>{html.escape(ex['name'])}</h3><div class=\"grid\">")
        for title, rel in ex["panels"].items():
            path = root / rel
            if path.is_file():
                parts.append(_figure(_file_to_data_uri(path), title, 230))
        parts.append("</div>")
    return parts


def render_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``index.html`` for a results folder and return its path.

    Args:
        results_dir: folder holding ``results.json`` (and the example PNGs it references).
        out: output file; defaults to ``results_dir/index.html``.
    """
    root = Path(results_dir)
    path = root / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {root} (run `segcal benchmark` or `segcal demo` first)")
    results = json.loads(path.read_text())
    meta = results.get("meta", {})
    title = f"segcal report — {meta.get('model', '?')} on {meta.get('dataset', '?')}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    meta_items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
    parts.append(f'<ul class="meta">{meta_items}</ul>')
    for note in results.get("notes", []):
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts += _summary_section(results)
    parts += _calibration_section(results)
    parts += _detection_section(results)
    parts += _shift_section(results)
    parts += _examples_section(results, root)
    parts.append("</body></html>")
    target = Path(out) if out is not None else root / "index.html"
    target.write_text("\n".join(parts), encoding="utf-8")
    return target
