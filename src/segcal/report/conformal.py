"""HTML section of the report for conformal risk control (the JSON written by :func:`segcal.conformal.evaluate`).

Self-contained: tables, an inline base64 PNG of risk vs α and of the set-size maps (matplotlib, optional — without
it the section keeps its tables), every text escaped. ``section(results)`` takes either the whole results dict (and
reads ``results["conformal"]``) or the conformal dict itself; a list of such dicts (several α or controllers) renders
one block each.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["GUARANTEE_TEXT", "section"]

#: What the guarantee says and does not say (shown under every conformal section).
GUARANTEE_TEXT = (
    "What the guarantee covers: if a new image is exchangeable with the calibration images (drawn the same way, "
    "e.g. a random split of one image pool), the expected loss on it is at most α, on average over the draw of the "
    "calibration split. It is a statement per image, not per pixel (a guaranteed image may still have up to ε of its "
    "pixels uncovered, and those pixels concentrate on object boundaries and small classes), and it is marginal: "
    "not per class, per sequence or per weather condition. It does not cover data that differ from the calibration "
    "split — another sequence, time of day, camera or model — where the observed risk can exceed α by far; the "
    "per-subset rows show how far. The interval next to each risk is a binomial (Clopper–Pearson) interval for 0/1 "
    "losses and a normal one otherwise; it describes this test split, not the guarantee."
)


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _f(x: object, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return _e(x)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return ('<img alt="figure" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode("ascii")
            + '">')


def _risk_cells(r: Mapping[str, Any]) -> str:
    ci = r.get("risk_ci") or [None, None]
    ok = r.get("meets_alpha")
    mark = "" if ok is None else (" ✓" if ok else " ✗")
    return (f"<td>{_f(r.get('n_images'))}</td><td>{_f(r.get('risk'))}{mark}</td>"
            f"<td>[{_f(ci[0])}, {_f(ci[1])}] {_e(r.get('interval') or '')}</td>"
            f"<td>{_f(r.get('coverage'))}</td><td>{_f(r.get('pixel_coverage'))}</td>"
            f"<td>{_f(r.get('mean_set_size'), 2)}</td>")


def _alpha_plot(res: Mapping[str, Any]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return "<p><i>matplotlib is not installed: plots omitted.</i></p>"
    splits = res.get("splits") or {}
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    top = 0.0
    for name, s in splits.items():
        sw = [p for p in s.get("sweep") or [] if p.get("risk") is not None]
        if sw:
            a = [p["alpha"] for p in sw]
            ax.plot(a, [p["risk"] for p in sw], "-o", ms=3, label=str(name))
            top = max(top, *a)
    if top == 0.0:
        plt.close(fig)
        return ""
    ax.plot([0, top], [0, top], "k:", label="risk = α")
    ax.set_xlabel("α")
    ax.set_ylabel("observed risk (held-out)")
    ax.set_title("risk vs α (thresholds from the calibration curve)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _set_size_maps(res: Mapping[str, Any]) -> str:
    maps = [(split, ex) for split, s in (res.get("splits") or {}).items() for ex in (s.get("examples") or [])]
    if not maps:
        return ""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return ""
    maps = maps[:6]
    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.0), squeeze=False)
    vmax = max(2, max(int(np.max(ex["set_size"])) for _, ex in maps))
    for ax, (split, ex) in zip(axes[0], maps, strict=True):
        size = np.asarray(ex["set_size"], dtype=float)
        if ex.get("valid") is not None:
            size = np.ma.masked_array(size, ~np.asarray(ex["valid"], dtype=bool))
        im = ax.imshow(size, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{split}: {ex.get('name', '')}", fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, label="set size")
    return _png(fig)


def _block(res: Mapping[str, Any]) -> str:
    params = res.get("params") or {}
    what = ", ".join(f"{_e(k)}={_e(v)}" for k, v in params.items() if k in ("epsilon", "loss", "score", "class_index",
                                                                             "count_empty", "calibrator"))
    cal = res.get("calibration") or {}
    parts = [f"<h3>{_e(res.get('method', 'risk control'))} (α = {_f(res.get('alpha'), 3)}{', ' if what else ''}"
             f"{what})</h3>",
             f"<p>Threshold λ̂ = {_f(res.get('threshold'), 5)} from {_f(cal.get('n_images'))} calibration images; "
             f"upper bound used (n·R̂ + B)/(n+1) = {_f(res.get('risk_bound'), 4)} ≤ α; calibration risk "
             f"{_f(cal.get('empirical_risk'), 4)}; mean set size per pixel on the calibration split "
             f"{_f(cal.get('set_size'), 3)}.</p>"]
    if res.get("feasible") is False:
        parts.append("<p><b>No threshold met the bound</b> (too few calibration images for this α): the sets are the "
                     "largest possible and carry no guarantee.</p>")
    rows = []
    for name, s in (res.get("splits") or {}).items():
        rows.append(f"<tr><th>{_e(name)}</th>{_risk_cells(s)}</tr>")
        for sub, r in (s.get("subsets") or {}).items():
            rows.append(f"<tr><td>&nbsp;&nbsp;{_e(name)} / {_e(sub)}</td>{_risk_cells(r)}</tr>")
    if rows:
        parts.append("<table><tr><th>held-out data</th><th>images</th><th>risk (✓ ≤ α)</th><th>95 % interval</th>"
                     "<th>coverage (1 − risk)</th><th>pixel coverage</th><th>mean set size</th></tr>"
                     + "".join(rows) + "</table>")
    first = next(iter((res.get("splits") or {}).values()), None)
    if first and first.get("per_class"):
        crow = "".join(f"<tr><td>{_e(c)}</td><td>{_f(v.get('pixels'))}</td><td>{_f(v.get('coverage'))}</td>"
                       f"<td>{_f(v.get('mean_set_size'), 2)}</td></tr>" for c, v in first["per_class"].items())
        parts.append("<details><summary>per class (first held-out split): pixel coverage and set size</summary>"
                     "<table><tr><th>class</th><th>pixels</th><th>coverage</th><th>mean set size</th></tr>"
                     f"{crow}</table></details>")
    parts.append(_alpha_plot(res))
    parts.append(_set_size_maps(res))
    return "\n".join(p for p in parts if p)


def section(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """HTML for the conformal results (see the module docstring); an empty string when there are none."""
    res: Any = results
    if isinstance(res, Mapping) and "conformal" in res:
        res = res["conformal"]
    if not res:
        return ""
    blocks = list(res) if isinstance(res, Sequence) and not isinstance(res, (str, bytes)) else [res]
    if isinstance(res, Mapping) and "splits" not in res:  # {name: evaluate() result}
        blocks = list(res.values())
    body = "\n".join(_block(b) for b in blocks if isinstance(b, Mapping))
    return (f'<section id="conformal"><h2>Conformal risk control</h2>\n{body}\n'
            f"<p><i>{_e(GUARANTEE_TEXT)}</i></p></section>")
