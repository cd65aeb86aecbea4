"""Render a results folder (``results.json`` + example images) as one self-contained HTML page.

The page embeds every figure as a base64 PNG, so ``index.html`` can be mailed or archived on its own. Schema of
``results.json`` (written by :mod:`segcal.engine.benchmark`; every key is optional — a missing one gives a note on
the page, never a crash)::

    meta:        {model, dataset, fit split, eval splits, num_classes, ignore_index, n_bins, seed, segcal_version,
                  palette: [[r, g, b], ...] (optional: colours of the class maps in the example panels)}
    class_names: [...]                                   # the only source of class names
    config:      {...}                                   # shown collapsed
    calibration: {eval_set: {method: {ece, mce, ace, cw_ece, nll, brier, oe, miou, ...,
                                      reliability: {edges, count, confidence, accuracy},
                                      per_class_ece: [...], ece_correct, ece_wrong}}}
    bootstrap:   {eval_set: {"<method> vs uncalibrated": {metric, diff, low, high, level, n_resamples, seed,
                                                         significant}}}   # diff = metric(method) - metric(uncal.)
    detection:   {protocol: {detector: {auroc, ap, fpr95, roc: [fpr, tpr], pr: [recall, precision]}}}
    shift:       {corruption: {severity: {metric: value}}}
    examples:    [{name, panels: {title: relative png path | {path, kind: "labels"|"scalar"|"image",
                                                               cmap, vmin, vmax, label}}}]
    skipped:     [{stage, reason}]
    conformal:   {...}   # rendered by segcal.report.conformal.section(results) when that module exists

Panel paths must be relative paths inside the results folder: absolute paths, ``..`` and symlinks that leave it are
refused (the page says so), so a crafted results.json cannot make the report embed another file.
"""

from __future__ import annotations

import base64
import colorsys
import html
import importlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcal._io import confine
from segcal.report.displays import CurveDisplay, PerClassDisplay, ReliabilityDisplay, SeverityDisplay
from segcal.report.glossary import METHODS, METRICS, method_info, method_name, metric_info

CALIBRATION_COLUMNS = ("ece", "mce", "ace", "cw_ece", "nll", "brier", "oe", "image_ece", "boundary_ece",
                       "interior_ece", "ece_correct", "ece_wrong", "accuracy", "miou", "fit_time_s")
DETECTION_COLUMNS = ("auroc", "ap", "fpr95", "auroc_per_image", "ap_per_image", "fpr95_per_image", "open_set_miou",
                     "closed_set_miou")
#: Kept for backwards compatibility: metric keys by direction (see :mod:`segcal.report.glossary`).
LOWER_IS_BETTER = {k for k, (_, d, _) in METRICS.items() if d in ("zero", "min")}
HIGHER_IS_BETTER = {k for k, (_, d, _) in METRICS.items() if d == "max"}
BASELINE = "uncalibrated"
_PANEL_WIDTH = 205  # six engine panels (image, truth, prediction, confidence, errors, one score) fit one 1320 px row

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;color:#222;
     padding:0 16px}
h1{font-size:24px;margin-bottom:6px} h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 4px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0 12px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right} th{background:#f3f3f3;white-space:nowrap}
th[title]{cursor:help;text-decoration:underline dotted #999}
td:first-child,th:first-child{text-align:left}
td.best{background:#d8f0d8;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start} .grid figure{margin:0}
figcaption{font-size:11.5px;color:#555;text-align:center;max-width:100%}
img{max-width:100%} .note{font-size:12.5px;color:#444;max-width:1100px}
.warn{font-size:12.5px;color:#8a4b00;background:#fff6e5;border-left:3px solid #e0a030;padding:4px 8px}
table.meta td,table.meta th{text-align:left;font-size:12px}
ul.summary li{margin:3px 0}
details{margin:6px 0 10px} summary{cursor:pointer;font-size:13px;color:#234}
dl.glossary{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:12.5px}
dl.glossary dt{font-weight:bold} dl.glossary dd{margin:0}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin:4px 0 10px}
.legend span.sw{display:inline-block;width:14px;height:14px;border:1px solid #888;vertical-align:-3px;margin-right:4px}
.cbar{width:205px;font-size:11px;color:#444} .cbar .bar{height:10px;border:1px solid #888}
.cbar .ends{display:flex;justify-content:space-between} .cbar .cap{text-align:center;color:#666}
"""


# ------------------------------------------------------------------------------------------------ small helpers
def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value else None


def _fig_to_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
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


def _note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{text}</p>'


def _figure(uri: str, caption: str, width: int = 380) -> str:
    return (f'<figure><img src="{uri}" width="{width}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{summary}</summary>{body}</details>"


def _header(key: str) -> str:
    info = metric_info(key)
    if info is None:
        return f"<th>{_esc(key)}</th>"
    name, direction, text = info
    arrow = {"zero": " →0", "min": " ↓", "max": " ↑"}.get(direction or "", "")
    return f'<th title="{_esc(name + ": " + text)}">{_esc(key)}{arrow}</th>'


# ------------------------------------------------------------------------------------------------ tables
def best_values(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> dict[str, float]:
    """Best value per column by the metric's direction: calibration errors closest to 0, NLL/Brier/FPR95 smallest,
    accuracy/mIoU/AUROC/AP largest; OE and unknown columns are not ranked. Needs two different values."""
    best: dict[str, float] = {}
    for c in columns:
        info = metric_info(c)
        direction = info[1] if info else None
        vals = [v for r in rows.values() if (v := _num(r.get(c))) is not None]
        if direction is None or len(vals) < 2 or min(vals) == max(vals):
            continue  # nothing to rank (an all-equal column has no best)
        if direction == "zero":
            best[c] = min(vals, key=abs)
        elif direction == "min":
            best[c] = min(vals)
        else:
            best[c] = max(vals)
    return best


def metrics_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str],
                  extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """An HTML table with the best value of each column highlighted (see :func:`best_values`).

    Args:
        rows: ``{row name: {column: value}}``.
        columns: candidate columns; those without any numeric value are dropped.
        extra: additional columns ``{header: {row name: HTML}}`` appended as given (already escaped).
    """
    present = [c for c in columns if any(_num(r.get(c)) is not None for r in rows.values())]
    best = best_values(rows, present)
    extra = extra or {}
    head = "".join(_header(c) for c in present) + "".join(f"<th>{_esc(h)}</th>" for h in extra)
    out = [f"<table><tr><th>method</th>{head}</tr>"]
    for name, r in rows.items():
        cells = []
        for c in present:
            v = r.get(c)
            hit = c in best and _num(v) is not None and _num(v) == best[c]
            cells.append(f'<td class="best">{_fmt(v)}</td>' if hit else f"<td>{_fmt(v)}</td>")
        cells += [f"<td>{col.get(name, '—')}</td>" for col in extra.values()]
        info = method_info(name)
        title = f' title="{_esc(info[1])}"' if info else ""
        out.append(f"<tr><td{title}>{_esc(name)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ bootstrap
def _bootstrap_entries(results: Mapping[str, Any], eval_set: str) -> dict[str, list[dict[str, Any]]]:
    """``{method: [entry, ...]}`` for "<method> vs uncalibrated" entries of one eval set."""
    raw = (results.get("bootstrap") or {}).get(eval_set) or {}
    out: dict[str, list[dict[str, Any]]] = {}
    if not isinstance(raw, Mapping):
        return out
    for key, entry in raw.items():
        method = str(key).split(" vs ")[0].strip()
        items = entry if isinstance(entry, list) else [entry]
        out[method] = [e for e in items if isinstance(e, Mapping) and _num(e.get("diff")) is not None]
    return out


def bootstrap_statement(method: str, entry: Mapping[str, Any], baseline: str = BASELINE) -> str:
    """One sentence for a paired-bootstrap entry (``diff = metric(method) - metric(baseline)``).

    Examples: "TS beats uncalibrated by 0.031 ECE [0.024, 0.038], 95 %" or
    "VS vs uncalibrated: no significant difference in ECE (Δ = -0.0021, 95 % interval [-0.0060, 0.0031])".
    """
    metric = str(entry.get("metric", "ece"))
    info = metric_info(metric)
    label = info[0] if info else metric
    direction = info[1] if info else "min"
    diff, low, high = (_num(entry.get(k)) for k in ("diff", "low", "high"))
    level = _num(entry.get("level")) or 0.95
    pct = f"{100 * level:g} %"
    who = method_name(method)
    if diff is None or low is None or high is None:
        return f"{_esc(who)} vs {_esc(baseline)}: no bootstrap interval in results.json"
    significant = bool(entry.get("significant", low > 0 or high < 0))
    tail = ""
    if _num(entry.get("n_resamples")) is not None:
        tail = f" (paired bootstrap over images, {int(entry['n_resamples'])} resamples, seed {_esc(entry.get('seed'))})"
    if not significant:
        return (f"{_esc(who)} vs {_esc(baseline)}: no significant difference in {_esc(label)} "
                f"(Δ = {diff:+.4f}, {pct} interval [{low:+.4f}, {high:+.4f}] contains 0){tail}")
    better_if_negative = direction != "max"
    gain, lo, hi = (-diff, -high, -low) if better_if_negative else (diff, low, high)
    verb = "beats" if gain > 0 else "is worse than"
    if gain < 0:
        gain, lo, hi = -gain, -hi, -lo
    return (f"<b>{_esc(who)}</b> {verb} {_esc(baseline)} by {gain:.3f} {_esc(label)} [{lo:.3f}, {hi:.3f}], "
            f"{pct}{tail}")


def _bootstrap_column(entries: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    col: dict[str, str] = {}
    levels = {_num(e.get("level")) or 0.95 for items in entries.values() for e in items}
    header = "Δ vs uncalibrated [" + ", ".join(f"{100 * v:g} %" for v in sorted(levels)) + "]"
    for method, items in entries.items():
        cells = []
        for e in items:
            info = metric_info(str(e.get("metric", "")))
            label = info[0] if info else str(e.get("metric", "?"))
            low, high = _num(e.get("low")), _num(e.get("high"))
            ci = f" [{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else ""
            star = "" if e.get("significant") else " n.s."
            cells.append(f"{_esc(label)} {e['diff']:+.4f}{ci}{star}")
        col[method] = "<br>".join(cells)
    return {header: col} if col else {}


# ------------------------------------------------------------------------------------------------ sections
def _title(meta: Mapping[str, Any]) -> tuple[str, list[str]]:
    model, dataset = meta.get("model"), meta.get("dataset")
    notes = []
    if model and dataset:
        return f"segcal report — {model} on {dataset}", notes
    missing = [k for k, v in (("model", model), ("dataset", dataset)) if not v]
    notes.append(_note(f"results.json has no meta.{' / meta.'.join(missing)}: the page cannot say which model and "
                       "data these numbers are for.", "warn"))
    if model or dataset:
        return f"segcal report — {model or dataset}", notes
    return "segcal report", notes


def _meta_section(meta: Mapping[str, Any]) -> list[str]:
    order = ("model", "dataset", "fit split", "calibration fit", "eval splits", "evaluation", "num_classes",
             "ignore_index", "n_bins", "seed", "segcal_version")
    keys = [k for k in order if k in meta] + [k for k in meta if k not in order and k != "palette"]
    if not keys:
        return [_note("results.json has no <code>meta</code>: model, data, splits and seed are unknown.", "warn")]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(meta[k])}</td></tr>" for k in keys)
    return [f'<table class="meta">{rows}</table>']


def _summary_section(results: Mapping[str, Any]) -> list[str]:
    """Per eval set: the lowest-ECE method and the paired-bootstrap statements against the uncalibrated model."""
    items = []
    calibration = results.get("calibration") or {}
    for eval_set, methods in calibration.items():
        if not isinstance(methods, Mapping):
            continue
        scored = {m: v for m, r in methods.items() if isinstance(r, Mapping) and (v := _num(r.get("ece"))) is not None}
        entries = _bootstrap_entries(results, eval_set)
        parts = []
        if len(scored) >= 2:
            best = min(scored, key=lambda m: abs(scored[m]))
            parts.append(f"lowest ECE: <b>{_esc(method_name(best))}</b> {scored[best]:.4f}")
            ece_entry = [e for e in entries.get(best, []) if str(e.get("metric", "ece")) == "ece"]
            if best != BASELINE and not entries:
                parts.append("<i>no uncertainty estimate (results.json has no bootstrap for this set): the ranking "
                             "may be noise</i>")
            elif best != BASELINE and ece_entry and not ece_entry[0].get("significant"):
                parts.append("<i>not significantly different from uncalibrated</i>")
        statements = [bootstrap_statement(m, e) for m, es in entries.items() for e in es]
        if parts or statements:
            sub = "".join(f"<li>{s}</li>" for s in statements)
            items.append(f"<li><b>{_esc(eval_set)}</b>: {'; '.join(parts)}" + (f"<ul>{sub}</ul>" if sub else "")
                         + "</li>")
    for protocol, detectors in (results.get("detection") or {}).items():
        if not isinstance(detectors, Mapping):
            continue
        au = {d: v for d, r in detectors.items() if isinstance(r, Mapping) and (v := _num(r.get("auroc"))) is not None}
        ap = {d: v for d, r in detectors.items() if isinstance(r, Mapping) and (v := _num(r.get("ap"))) is not None}
        if len(au) < 2:
            continue
        b_au = max(au, key=au.get)
        text = f"best AUROC <b>{_esc(method_name(b_au))}</b> {au[b_au]:.4f}"
        if len(ap) >= 2:
            b_ap = max(ap, key=ap.get)
            text += f", best AP <b>{_esc(method_name(b_ap))}</b> {ap[b_ap]:.4f}"
        items.append(f"<li><b>{_esc(protocol)}</b>: {text} <i>(no interval)</i></li>")
    if not items:
        return []
    return ["<h2>Summary</h2>", f'<ul class="summary">{"".join(items)}</ul>']


def _skipped_section(results: Mapping[str, Any]) -> list[str]:
    skipped = results.get("skipped") or []
    rows = [s for s in skipped if isinstance(s, Mapping)]
    if not rows:
        return []
    items = "".join(f"<li><b>{_esc(s.get('stage', '?'))}</b>: {_esc(s.get('reason', 'no reason given'))}</li>"
                    for s in rows)
    return ["<h2>Skipped stages</h2>", f'<ul class="warn">{items}</ul>']


def _reliability_grid(eval_set: str, methods: Mapping[str, Any]) -> str:
    figs = []
    for method, r in methods.items():
        rel = r.get("reliability") if isinstance(r, Mapping) else None
        if not isinstance(rel, Mapping):
            continue
        try:
            disp = ReliabilityDisplay.from_reliability(rel, label=method_name(method))
        except (KeyError, ValueError) as err:
            figs.append(_note(f"reliability of {_esc(method)} unreadable: {_esc(err)}", "warn"))
            continue
        figs.append(_figure(_fig_to_data_uri(disp.figure_), f"{method_name(method)} — {eval_set}", 290))
    return '<div class="grid">' + "".join(figs) + "</div>" if figs else ""


def _calibration_section(results: Mapping[str, Any]) -> list[str]:
    calibration = results.get("calibration")
    parts = ["<h2>Calibration</h2>"]
    if not calibration:
        parts.append(_note("No calibration results in results.json (key <code>calibration</code> missing or "
                           "empty).", "warn"))
        return parts
    parts.append(_note("Green = best in column: calibration errors (→0) closest to 0, NLL / Brier (↓) smallest, "
                       "accuracy / mIoU (↑) largest. OE is one-sided (0 for any under-confident model) and is not "
                       "ranked. Hover a column or method for its definition; see the glossary below."))
    class_names = results.get("class_names") or []
    first = True
    for eval_set, methods in calibration.items():
        parts.append(f"<h3>{_esc(eval_set)}</h3>")
        if not isinstance(methods, Mapping) or not methods:
            parts.append(_note("no methods evaluated on this set", "warn"))
            continue
        rows = {m: (r if isinstance(r, Mapping) else {}) for m, r in methods.items()}
        parts.append(metrics_table(rows, CALIBRATION_COLUMNS, _bootstrap_column(_bootstrap_entries(results,
                                                                                                   eval_set))))
        grid = _reliability_grid(eval_set, rows)
        if grid:
            parts.append(_details(f"Reliability diagrams — {_esc(eval_set)}", grid, open_=first))
        per_class = {m: r["per_class_ece"] for m, r in rows.items() if isinstance(r.get("per_class_ece"), list)}
        if per_class:
            n = max(len(v) for v in per_class.values())
            names = list(class_names)
            note = ""
            if len(names) != n:
                note = _note(f"results.json has {len(names)} class names for {n} classes: classes are numbered.",
                             "warn")
                names = [f"class {k}" for k in range(n)]
            disp = PerClassDisplay(per_class, names, metric="classwise ECE").plot()
            body = note + _figure(_fig_to_data_uri(disp.figure_),
                                  f"classwise ECE per class (one-vs-rest) — {eval_set}", 760)
            parts.append(_details(f"Classwise ECE per class — {_esc(eval_set)}", body, open_=first))
        first = False
    return parts


def _detection_section(results: Mapping[str, Any]) -> list[str]:
    detection = results.get("detection")
    if not detection:
        return ["<h2>Error and OOD detection</h2>",
                _note("No detection results in results.json (key <code>detection</code> missing or empty).", "warn")]
    parts = ["<h2>Error and OOD detection</h2>",
             _note("Scores: higher = more likely an error / OOD pixel. AUROC, AP (↑): larger is better; FPR95 (↓): "
                   "smaller is better.")]
    first = True
    for protocol, detectors in detection.items():
        parts.append(f"<h3>{_esc(protocol)}</h3>")
        if not isinstance(detectors, Mapping) or not detectors:
            parts.append(_note("no detectors evaluated", "warn"))
            continue
        rows = {d: (r if isinstance(r, Mapping) else {}) for d, r in detectors.items()}
        parts.append(metrics_table(rows, DETECTION_COLUMNS))
        roc = {method_name(d): tuple(r["roc"]) for d, r in rows.items() if "roc" in r}
        pr = {method_name(d): tuple(r["pr"]) for d, r in rows.items() if "pr" in r}
        figs = []
        if roc:
            scores = {method_name(d): r["auroc"] for d, r in rows.items() if _num(r.get("auroc")) is not None}
            disp = CurveDisplay(roc, "roc", "", scores).plot()
            figs.append(_figure(_fig_to_data_uri(disp.figure_), f"ROC (legend: AUROC) — {protocol}"))
        if pr:
            scores = {method_name(d): r["ap"] for d, r in rows.items() if _num(r.get("ap")) is not None}
            disp = CurveDisplay(pr, "pr", "", scores).plot()
            figs.append(_figure(_fig_to_data_uri(disp.figure_), f"precision–recall (legend: AP) — {protocol}"))
        if figs:
            parts.append(_details(f"ROC and precision–recall curves — {_esc(protocol)}",
                                  '<div class="grid">' + "".join(figs) + "</div>", open_=first))
            first = False
    return parts


def _shift_section(results: Mapping[str, Any]) -> list[str]:
    """Severity curves: per metric family (e.g. ECE per calibrator) averaged over corruptions."""
    shift = results.get("shift") or {}
    if not isinstance(shift, Mapping) or not shift:
        return []
    parts = ["<h2>Domain shift (corruption severity)</h2>",
             _note(f"Corruptions: {_esc(', '.join(shift))}; severity 0 = clean frames. Curves average over "
                   "corruptions unless the legend names a corruption.")]
    keys = sorted({k for by_sev in shift.values() for vals in by_sev.values() for k in vals})
    families: dict[str, list[str]] = {}
    for key in keys:
        family = key.rpartition(" ")[0] if " " in key else key
        families.setdefault(family, []).append(key)
    sevs = sorted({int(s) for by_sev in shift.values() for s in by_sev})
    figs = []
    for family, members in families.items():
        series = {}
        for key in members:
            label = key[len(family):].strip() or key
            series[label] = {}
            for s in sevs:
                vals = [by_sev[str(s)][key] for by_sev in shift.values()
                        if str(s) in by_sev and _num(by_sev[str(s)].get(key)) is not None]
                if vals:
                    series[label][s] = float(np.mean(vals))
        disp = SeverityDisplay(series, family, "").plot()
        figs.append(_figure(_fig_to_data_uri(disp.figure_), f"{family} vs corruption severity", 420))
    parts.append('<div class="grid">' + "".join(figs) + "</div>")
    return parts


# ------------------------------------------------------------------------------------------------ examples
def class_palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, deterministic (golden-ratio hues, alternating lightness)."""
    out = []
    for k in range(n):
        h = (k * 0.618033988749895) % 1.0
        light = 0.45 if k % 2 == 0 else 0.62
        r, g, b = colorsys.hls_to_rgb(h, light, 0.75)
        out.append((round(255 * r), round(255 * g), round(255 * b)))
    return out


def _palette(results: Mapping[str, Any], n: int) -> tuple[list[tuple[int, int, int]], str]:
    given = (results.get("meta") or {}).get("palette")
    if isinstance(given, list) and len(given) >= n and all(isinstance(c, list | tuple) and len(c) >= 3
                                                           for c in given[:n]):
        return [tuple(int(v) for v in c[:3]) for c in given[:n]], ""
    return class_palette(n), ("results.json gives no <code>meta.palette</code>: the legend shows segcal's default "
                              "palette (<code>segcal.report.class_palette</code>); it matches the panels only if "
                              "they were drawn with it.")


def _class_legend(results: Mapping[str, Any]) -> str:
    names = results.get("class_names") or []
    if not names:
        return _note("results.json has no <code>class_names</code>: no class legend.", "warn")
    colours, caveat = _palette(results, len(names))
    sw = "".join(f'<span><span class="sw" style="background:rgb{c}"></span>{_esc(n)}</span>'
                 for n, c in zip(names, colours, strict=True))
    sw += '<span><span class="sw" style="background:rgb(0, 0, 0)"></span>void / ignored</span>'
    return f'<div class="legend">{sw}</div>' + (_note(caveat) if caveat else "")


def _panel_spec(title: str, value: Any) -> dict[str, Any]:
    """Normalise a panel entry; plain paths get their kind from the title (the engine's panel names)."""
    spec = dict(value) if isinstance(value, Mapping) else {"path": value}
    if "kind" not in spec:
        t = title.lower()
        if any(w in t for w in ("ground truth", "prediction", "segmentation", "labels")):
            spec["kind"] = "labels"
        elif "confidence" in t:
            spec.update(kind="scalar", cmap="viridis", vmin=0.0, vmax=1.0)
        elif "score" in t:
            spec.update(kind="scalar", cmap="magma", vmin="low", vmax="high",
                        label="rank-normalised (1st–99th percentile)")
        else:
            spec["kind"] = "image"
    return spec


def _colorbar(spec: Mapping[str, Any]) -> str:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[str(spec.get("cmap", "viridis"))]
    except KeyError:
        return ""
    stops = ", ".join("rgb({}, {}, {})".format(*(int(255 * v) for v in cmap(x)[:3])) for x in np.linspace(0, 1, 11))
    lo, hi = spec.get("vmin", "low"), spec.get("vmax", "high")
    label = spec.get("label", "")
    caption = f'<div class="cap">{_esc(label)}</div>' if label else ""
    return (f'<div class="cbar"><div class="bar" style="background:linear-gradient(to right, {stops})"></div>'
            f'<div class="ends"><span>{_esc(lo)}</span><span>{_esc(hi)}</span></div>{caption}</div>')


def _examples_section(results: Mapping[str, Any], root: Path) -> list[str]:
    examples = results.get("examples") or []
    if not examples:
        return []
    parts = ["<h2>Examples</h2>",
             _note("Panels of the engine; class maps use the legend below, score maps the colour bar under each.")]
    specs = [[(t, _panel_spec(str(t), v)) for t, v in (ex.get("panels") or {}).items()]
             for ex in examples if isinstance(ex, Mapping)]
    if any(s["kind"] == "labels" for row in specs for _, s in row):
        parts.append(_class_legend(results))
    for ex, row in zip([e for e in examples if isinstance(e, Mapping)], specs, strict=True):
        parts.append(f"<h3>{_esc(ex.get('name', '?'))}</h3><div class=\"grid\">")
        for title, spec in row:
            try:
                path = confine(spec.get("path"), root)
            except ValueError:
                parts.append(_note(f"panel “{_esc(title)}” refused: its path {_esc(spec.get('path'))} is not a "
                                   "relative path inside the results folder.", "warn"))
                continue
            if not path.is_file():
                parts.append(_note(f"panel “{_esc(title)}” missing: {_esc(spec.get('path'))}", "warn"))
                continue
            extra = _colorbar(spec) if spec["kind"] == "scalar" else ""
            fig = _figure(_file_to_data_uri(path), str(title), _PANEL_WIDTH)
            parts.append(fig.replace("</figure>", extra + "</figure>") if extra else fig)
        parts.append("</div>")
    return parts


def _conformal_section(results: Mapping[str, Any]) -> list[str]:
    if "conformal" not in results:
        return []
    try:
        module = importlib.import_module("segcal.report.conformal")
    except ImportError:
        return []
    return [module.section(results)]


def _glossary_section(results: Mapping[str, Any]) -> list[str]:
    """Definitions of the metric columns and the methods that appear on this page."""
    shown_metrics: set[str] = set()
    shown_methods: set[str] = set()
    for group in ("calibration", "detection"):
        for rows in (results.get(group) or {}).values():
            if isinstance(rows, Mapping):
                shown_methods.update(str(m).strip().lower() for m in rows)
                for r in rows.values():
                    if isinstance(r, Mapping):
                        shown_metrics.update(k for k, v in r.items() if _num(v) is not None)
    metric_rows = [(k, metric_info(k)) for k in (*CALIBRATION_COLUMNS, *DETECTION_COLUMNS) if k in shown_metrics]
    metric_html = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(info[2])}</dd>" for k, info in metric_rows if info)
    method_html = "".join(f"<dt>{_esc(k)}</dt><dd><b>{_esc(v[0])}</b>: {_esc(v[1])}</dd>"
                          for k, v in METHODS.items() if k in shown_methods)
    if not metric_html and not method_html:
        return []
    out = ['<h2 id="glossary">Glossary</h2>']
    if metric_html:
        out.append(f'<h3>Metrics</h3><dl class="glossary">{metric_html}</dl>')
    if method_html:
        out.append(f'<h3>Methods</h3><dl class="glossary">{method_html}</dl>')
    out.append(_note("Intervals: paired bootstrap over images (the same resampled images for both methods; pixels "
                     "of an image are not independent, so images are resampled, not pixels). “Significant” = the "
                     "interval excludes 0."))
    return out


def _config_section(results: Mapping[str, Any]) -> list[str]:
    config = results.get("config")
    if not config:
        return []
    text = _esc(json.dumps(config, indent=1, sort_keys=True, default=str))
    return [_details("Configuration of the run", f"<pre style='font-size:11.5px'>{text}</pre>")]


def render_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``index.html`` for a results folder and return its path.

    Args:
        results_dir: folder holding ``results.json`` (and the example PNGs it references).
        out: output file; defaults to ``results_dir/index.html``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    root = Path(results_dir)
    path = root / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {root} (run `segcal benchmark` or `segcal demo` first)")
    results = json.loads(path.read_text())
    if not isinstance(results, Mapping):
        raise ValueError(f"{path} must hold a JSON object, got {type(results).__name__}")
    meta = results.get("meta") if isinstance(results.get("meta"), Mapping) else {}
    title, title_notes = _title(meta)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>", *title_notes]
    parts += _meta_section(meta)
    for note in results.get("notes", []) or []:
        parts.append(_note(_esc(note)))
    parts += _summary_section(results)
    parts += _skipped_section(results)
    parts.append(_note('Definitions of every column and method: <a href="#glossary">glossary</a>.'))
    parts += _calibration_section(results)
    parts += _detection_section(results)
    parts += _conformal_section(results)
    parts += _shift_section(results)
    parts += _examples_section(results, root)
    parts += _glossary_section(results)
    parts += _config_section(results)
    parts.append("</body></html>")
    target = Path(out) if out is not None else root / "index.html"
    target.write_text("\n".join(parts), encoding="utf-8")
    return target
