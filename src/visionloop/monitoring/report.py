"""``visionloop monitor report``: one self-contained HTML page about a drift check.

The page makes no request of its own (CSS inline, plots as base64 PNG drawn by matplotlib's Agg canvas),
so it can be mailed, attached to a ticket or opened from an artifact store. It shows the verdict and why,
every test of the latest check, live accuracy, and the reference next to the window: the image statistics,
the class mix, the confidence, a 2-D projection of the embeddings, and the p-values of past checks.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.dates import ConciseDateFormatter
from matplotlib.figure import Figure

from visionloop.errors import VisionloopError
from visionloop.fsutil import atomic_write_text
from visionloop.monitoring.schema import DriftResult, TestResult
from visionloop.monitoring.stats import Sample

log = logging.getLogger("visionloop.report")

REFERENCE, WINDOW, ALARM = "#4c72b0", "#dd8452", "#c44e52"
MAX_POINTS = 1500  # per side in the embedding scatter, so a big reference stays a readable (and small) plot
MAX_CLASSES = 30  # bars in the class-mix plot; past it, the classes with the largest share on either side
ORIGINS = {"export": "made at export", "rebuilt": "rebuilt from the dataset"}
MAX_REASONS = 6  # reasons listed in the header; the tests table has them all
P_FLOOR = 1e-12  # p-values below this are drawn at it: a log axis down to 1e-300 would hide everything else
VERDICTS = {
    "drifted": ("drifted", ALARM),
    "accuracy_below_floor": ("live accuracy below floor", ALARM),
    "ok": ("ok", "#55a868"),
    "insufficient_data": ("insufficient data", "#dd9c2a"),
}

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 8px}h2{font-size:20px;margin:28px 0 10px}h3{font-size:16px;margin:18px 0 8px}
.card{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:16px 20px;margin-bottom:16px}
.badge{display:inline-block;color:#fff;border-radius:6px;padding:3px 12px;font-weight:600;font-size:17px}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:4px 24px;margin-top:10px}
.facts div span{color:#666}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid #eceef1}th{background:#f0f2f5}
.num{font-variant-numeric:tabular-nums;text-align:right}
tr.drifted td{background:#fbe9e9;color:#8a1c1c;font-weight:600}
figure{margin:0 0 16px}figure img{max-width:100%;display:block;margin:0 auto}
figcaption{color:#555;font-size:13px;margin-top:4px}
.nodata{border:2px dashed #ccd;border-radius:8px;padding:40px;text-align:center;color:#667;font-size:16px}
footer{color:#888;font-size:12px;margin-top:24px}
"""


def write_report(
    out: Path,
    *,
    model_name: str,
    model_version: str,
    classes: list[str],
    reference: Sample,
    window: Sample,
    latest: DriftResult,
    history: list[DriftResult],
) -> Path:
    """Write the report of ``latest`` (and the p-values of ``history``) to ``out`` atomically; return ``out``."""
    checks = sorted({c.checked_at: c for c in [*history, latest]}.values(), key=lambda c: c.checked_at)
    tests = {t.name: t for t in latest.tests}
    figures = [
        _figure("Image statistics", "Density of each image statistic.", _image_stats, reference, window, tests),
        _figure("Class mix", "Share of predictions per class.", _class_mix, reference, window, classes, tests),
        _figure("Confidence", "Top-class probability of each prediction.", _confidence, reference, window),
        _figure(
            "Embeddings", "PCA fitted on the reference; both sides projected.", _embeddings, reference, window, tests
        ),
        _figure("p-values over time", "Smallest adjusted p-value per detector and check.", _p_values, checks),
    ]
    body = [
        _header(model_name, model_version, latest),
        _tests_table(latest.tests),
        _accuracy_table(latest),
        "<h2>Reference vs window</h2>",
        *figures,
        f"<footer>generated {_when(datetime.now(UTC).timestamp())} by visionloop monitor report</footer>",
    ]
    title = escape(f"Drift report: {model_name} v{model_version}")
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n"
    )
    try:
        atomic_write_text(out, page)
    except OSError as exc:
        raise VisionloopError(f"cannot write the report to {out}: {exc.strerror or exc}") from exc
    return out


# ---- the page ----------------------------------------------------------------------------------------------------


def _header(model_name: str, model_version: str, latest: DriftResult) -> str:
    label, colour = VERDICTS.get(latest.status, (latest.status.replace("_", " "), "#777"))
    w, ref = latest.window, latest.reference
    facts = {
        "checked at": _when(latest.checked_at),
        "window": f"{w.size} predictions (of {w.requested} requested, at most {_age(w.max_age_seconds)} old)",
        "window span": f"{_age(w.span_seconds)}: {_when(w.first_time)} to {_when(w.last_time)}",
        "reference": "none"
        if ref is None
        else f"{ref.size} images of {'+'.join(ref.splits) or '?'}, {ORIGINS.get(ref.origin, ref.origin)}, "
        f"{_age(ref.age_seconds)} old",
    }
    facts |= {f"setting {k}": str(v) for k, v in latest.settings.items()}
    quiet = "no test crossed its threshold" if latest.status == "ok" else "no reason given"
    shown = latest.reasons[:MAX_REASONS] or [quiet]
    if len(latest.reasons) > MAX_REASONS:
        shown.append(f"... and {len(latest.reasons) - MAX_REASONS} more: see the tests below")
    reasons = "".join(f"<li>{escape(r)}</li>" for r in shown)
    cells = "".join(f"<div><span>{escape(k)}:</span> {escape(v)}</div>" for k, v in facts.items())
    return (
        f'<div class="card"><h1>Drift report: {escape(model_name)} v{escape(model_version)}</h1>'
        f'<span class="badge" style="background:{colour}">{escape(label)}</span>'
        f'<ul>{reasons}</ul><div class="facts">{cells}</div></div>'
    )


def _tests_table(tests: list[TestResult]) -> str:
    if not tests:
        return '<h2>Tests</h2><div class="nodata">no data: this check ran no test</div>'
    head = "<th>test</th><th>detector</th>" + "".join(
        f'<th class="num">{h}</th>' for h in ("statistic", "p-value", "adjusted p-value", "threshold")
    )
    head += "<th>verdict</th>"
    rows = "".join(
        f'<tr class="{"drifted" if t.drifted else "ok"}"><td>{escape(t.name)}</td><td>{t.detector}</td>'
        f'<td class="num">{t.statistic:.4g}</td><td class="num">{t.p_value:.3g}</td>'
        f'<td class="num">{t.adjusted_p_value:.3g}</td><td class="num">{t.threshold:.3g}</td>'
        f"<td>{'drifted' if t.drifted else 'ok'}</td></tr>"
        for t in tests
    )
    return f'<h2>Tests</h2><div class="card"><table><tr>{head}</tr>{rows}</table></div>'


def _accuracy_table(latest: DriftResult) -> str:
    if not latest.accuracy:
        return '<h2>Live accuracy</h2><div class="nodata">no data: no feedback labels in the window</div>'
    rows = "".join(
        f'<tr class="{"drifted" if a.below_floor else "ok"}"><td>{escape(a.model_version)}</td>'
        f'<td class="num">{a.count}</td><td class="num">{a.correct}</td>'
        f'<td class="num">{"-" if a.accuracy is None else f"{a.accuracy:.1%}"}</td>'
        f"<td>{'below floor' if a.below_floor else 'ok' if a.judged else 'too few labels'}</td></tr>"
        for a in latest.accuracy
    )
    head = '<tr><th>version</th><th class="num">labels</th><th class="num">correct</th><th class="num">accuracy</th>'
    head += "<th>verdict</th></tr>"
    return f'<h2>Live accuracy</h2><div class="card"><table>{head}{rows}</table></div>'


def _figure(title: str, caption: str, draw: Callable[..., Figure | None], *data: object) -> str:
    """One plot as an inline PNG; a plot that cannot be drawn says so in its place and spares the rest."""
    try:
        fig = draw(*data)
    except Exception as exc:  # a report with one plot missing beats no report
        log.warning("report plot %r failed", title, exc_info=True)
        return f'<h3>{title}</h3><div class="nodata">could not draw this plot: {escape(str(exc))}</div>'
    if fig is None:
        return f'<h3>{title}</h3><div class="nodata">no data for this plot</div>'
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    img = f'<img alt="{escape(title)}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
    return f'<h3>{title}</h3><figure class="card">{img}<figcaption>{caption}</figcaption></figure>'


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# ---- the plots: each returns a Figure, or None when there is nothing to draw -------------------------------------


def _annotate(ax: Axes, title: str, test: TestResult | None) -> None:
    if test is not None:
        title += f"\nadjusted p = {test.adjusted_p_value:.3g}" + (" (drifted)" if test.drifted else "")
    ax.set_title(title, fontsize=10, color=ALARM if test is not None and test.drifted else "black")


def _image_stats(reference: Sample, window: Sample, tests: dict[str, TestResult]) -> Figure | None:
    names = [n for n in reference.stats if n in window.stats]
    if not names or len(reference) == 0 or len(window) == 0:
        return None
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(3.2 * columns, 2.9 * rows), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, i + 1)
        ref, cur = (s.stats[name][np.isfinite(s.stats[name])] for s in (reference, window))
        both = np.concatenate([ref, cur])
        bins = np.histogram_bin_edges(both, bins=30) if both.size and np.ptp(both) > 0 else 10
        ax.hist(ref, bins=bins, density=True, color=REFERENCE, alpha=0.55, label=f"reference (n={len(ref)})")
        ax.hist(cur, bins=bins, density=True, color=WINDOW, alpha=0.55, label=f"window (n={len(cur)})")
        ax.set_xlabel(name)
        ax.set_ylabel("density")
        _annotate(ax, name, tests.get(f"ks:{name}"))
        if i == 0:
            ax.legend(fontsize=8)
    return fig


def _class_mix(reference: Sample, window: Sample, classes: list[str], tests: dict[str, TestResult]) -> Figure | None:
    if len(reference) == 0 or len(window) == 0:
        return None
    k = reference.probabilities.shape[1]
    names = [classes[i] if i < len(classes) else str(i) for i in range(k)]
    shares = [np.bincount(s.predicted, minlength=k)[:k] / len(s) for s in (reference, window)]
    shown = np.sort(np.argsort(-np.maximum(*shares), kind="stable")[:MAX_CLASSES])
    x = np.arange(len(shown))
    fig = Figure(figsize=(min(12, max(7, 2.5 + 0.45 * len(shown))), 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x - 0.2, shares[0][shown], 0.4, color=REFERENCE, label=f"reference (n={len(reference)})")
    ax.bar(x + 0.2, shares[1][shown], 0.4, color=WINDOW, label=f"window (n={len(window)})")
    ax.set_xticks(
        x, [names[i] for i in shown], rotation=45 if len(shown) > 10 else 0, ha="right" if len(shown) > 10 else "center"
    )
    ax.set_xlabel("predicted class" + (f" ({len(shown)} of {k} with the largest shares)" if len(shown) < k else ""))
    ax.set_ylabel("share of predictions")
    ax.legend(fontsize=8)
    _annotate(ax, "Predicted-class shares", tests.get("chi2:predicted_class"))
    return fig


def _confidence(reference: Sample, window: Sample) -> Figure | None:
    if len(reference) == 0 or len(window) == 0:
        return None
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 26)
    for sample, colour, label in ((reference, REFERENCE, "reference"), (window, WINDOW, "window")):
        weights = np.full(len(sample), 1 / len(sample))
        ax.hist(
            sample.confidence, bins=bins, weights=weights, color=colour, alpha=0.55, label=f"{label} (n={len(sample)})"
        )
        ax.axvline(float(np.median(sample.confidence)), color=colour, linestyle=":", linewidth=1.5)
    ax.set(xlabel="confidence (top-class probability; dotted: median)", ylabel="share of predictions", xlim=(0, 1))
    ax.set_title("Confidence distribution", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _embeddings(reference: Sample, window: Sample, tests: dict[str, TestResult]) -> Figure | None:
    ref, cur = (s.embeddings[np.isfinite(s.embeddings).all(axis=1)] for s in (reference, window))
    if len(ref) < 3 or len(cur) == 0 or ref.ndim != 2 or ref.shape[1] < 2 or cur.shape[1] != ref.shape[1]:
        return None
    rng = np.random.default_rng(0)  # the same points on every render of the same data
    ref = ref[rng.permutation(len(ref))[:MAX_POINTS]].astype(np.float64)
    cur = cur[rng.permutation(len(cur))[:MAX_POINTS]].astype(np.float64)
    centre = ref.mean(axis=0)
    _, singular, axes = np.linalg.svd(ref - centre, full_matrices=False)
    explained = singular[:2] ** 2 / max(float((singular**2).sum()), 1e-30)
    fig = Figure(figsize=(8, 5.6), layout="constrained")
    ax = fig.add_subplot()
    for points, colour, label in ((ref, REFERENCE, "reference"), (cur, WINDOW, "window")):
        xy = (points - centre) @ axes[:2].T
        ax.scatter(xy[:, 0], xy[:, 1], s=9, alpha=0.5, color=colour, label=f"{label} (n={len(points)})", linewidths=0)
    ax.set(xlabel=f"PC 1 ({explained[0]:.0%} of reference variance)", ylabel=f"PC 2 ({explained[1]:.0%})")
    ax.legend(fontsize=8, markerscale=2)
    _annotate(ax, "Embeddings, 2-D PCA", tests.get("mmd:embedding"))
    return fig


def _p_values(checks: list[DriftResult]) -> Figure | None:
    checks = [c for c in checks if c.tests]
    if not checks:
        return None
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax = fig.add_subplot()
    times = [datetime.fromtimestamp(c.checked_at, UTC) for c in checks]
    styles = iter([("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")] * 4)  # tell apart lines lying on each other
    for detector in sorted({t.detector for c in checks for t in c.tests}):
        smallest = [
            min((t.adjusted_p_value for t in c.tests if t.detector == detector), default=np.nan) for c in checks
        ]
        marker, line = next(styles)
        ax.plot(times, np.maximum(smallest, P_FLOOR), marker=marker, linestyle=line, markersize=4, label=detector)
    for threshold in sorted({t.threshold for c in checks for t in c.tests})[:4]:
        ax.axhline(threshold, color="black", linestyle=(0, (5, 4)), linewidth=1, label=f"threshold {threshold:.3g}")
    marked = [(t, min(x.adjusted_p_value for x in c.tests)) for t, c in zip(times, checks, strict=True) if c.drifted]
    if marked:
        x, y = zip(*marked, strict=True)
        ax.scatter(x, np.maximum(y, P_FLOOR), marker="X", s=60, color=ALARM, zorder=3, label="drifted check")
    ax.set_yscale("log")
    ax.set_ylim(P_FLOOR / 3, 1.5)
    ax.set(xlabel="check time (UTC)", ylabel=f"smallest adjusted p-value (floor {P_FLOOR:g})")
    ax.set_title(f"p-values over the last {len(checks)} checks", fontsize=10)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig
