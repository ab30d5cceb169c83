"""The HTML drift report: one self-contained file, every test and plot in it, degenerate inputs, atomic writes."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionloop.errors import VisionloopError
from visionloop.monitoring.report import write_report
from visionloop.monitoring.schema import DriftResult, LiveAccuracy, ReferenceInfo, TestResult, WindowInfo
from visionloop.monitoring.stats import Sample, stat_names

CLASSES = ["cat", "dog", "bird", "fish"]
NOW = 1_790_000_000.0


def make_sample(n: int, classes: int = 4, shift: float = 0.0, seed: int = 0, dim: int = 16) -> Sample:
    """``n`` rows of plausible statistics, softmax outputs and embeddings; ``shift`` moves all of them."""
    rng = np.random.default_rng(seed)
    stats = {name: rng.normal(0.4 + shift, 0.1, n) for name in stat_names(3)}
    stats["image_width"] = rng.integers(200, 400, n) * (1 + shift)
    stats["image_height"] = rng.integers(200, 400, n) * (1 + shift)
    logits = rng.normal(0, 1, (n, classes)) * 3
    logits[:, 0] += 4 * shift  # a shifted window predicts the first class more often
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    embeddings = rng.normal(shift, 1, (n, dim))
    return Sample(stats, probs, embeddings, NOW - np.linspace(600, 0, n) if n else np.zeros(0))


def make_result(
    status: str = "drifted", checked_at: float = NOW, p: float = 1e-6, tests: bool = True, size: int = 300
) -> DriftResult:
    names = [(f"ks:{s}", "image_stats") for s in stat_names(3)]
    names += [("ks:prob:0", "softmax"), ("chi2:predicted_class", "class_mix"), ("mmd:embedding", "embedding")]
    results = [
        TestResult(
            name=name,
            detector=detector,
            statistic=0.3,
            p_value=p / 10,
            adjusted_p_value=p if i % 2 == 0 else 0.5,
            threshold=0.0025,
            drifted=status == "drifted" and i % 2 == 0,
        )
        for i, (name, detector) in enumerate(names)
    ]
    return DriftResult(
        model_name="digits",
        model_version="3",
        checked_at=checked_at,
        duration_seconds=0.2,
        status=status,
        drifted=status == "drifted",
        reasons=[f"{t.name}: adjusted p {t.adjusted_p_value:.3g} < {t.threshold}" for t in results if t.drifted],
        window=WindowInfo(
            size=size, requested=200, max_age_seconds=3600, first_time=NOW - 600, last_time=NOW, span_seconds=600
        ),
        reference=ReferenceInfo(
            size=500, created_at=NOW - 86400 * 3, age_seconds=86400 * 3, origin="export", splits=["val", "test"]
        ),
        tests=results if tests else [],
        accuracy=[LiveAccuracy(model_version="3", count=50, correct=30, accuracy=0.6, judged=True, below_floor=True)],
        settings={"p_value": 0.01, "correction": "bonferroni", "window_size": 200, "mmd_permutations": 100},
    )


def inputs(**overrides: object) -> dict:
    args: dict = {
        "model_name": "digits",
        "model_version": "3",
        "classes": CLASSES,
        "reference": make_sample(500),
        "window": make_sample(300, shift=0.5, seed=1),
        "latest": make_result(),
        "history": [make_result(checked_at=NOW - 60 * i, p=10.0**-i) for i in range(12, 0, -1)],
    }
    return args | overrides


def render(tmp_path: Path, **overrides: object) -> tuple[Path, str]:
    out = write_report(tmp_path / "report.html", **inputs(**overrides))
    return out, out.read_text(encoding="utf-8")


def images(page: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    ]


def test_report_is_one_self_contained_file_with_every_test_and_plot(tmp_path: Path) -> None:
    out, page = render(tmp_path)
    assert out == tmp_path / "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left beside it
    assert page.startswith("<!DOCTYPE html>")
    for test in make_result().tests:
        assert test.name in page
    assert page.count('<tr class="drifted">') == sum(t.drifted for t in make_result().tests) + 1  # + accuracy row
    assert ">drifted</span>" in page  # the verdict badge
    assert "500 images of val+test, made at export, 3.0 d old" in page
    assert "p_value" in page and "bonferroni" in page
    plots = images(page)
    assert page.count("<img") == len(plots) == 5
    for plot in plots:
        assert plot.format == "PNG" and plot.width > 300 and plot.height > 200
    assert "http" not in page  # no external script, stylesheet, font or image
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []


@pytest.mark.parametrize(("status", "label"), [("ok", "ok"), ("insufficient_data", "insufficient data")])
def test_report_states_the_verdict(tmp_path: Path, status: str, label: str) -> None:
    _, page = render(tmp_path, latest=make_result(status=status))
    assert f">{label}</span>" in page
    assert '<tr class="drifted"><td>ks:' not in page


def test_empty_window_no_history_and_no_tests_say_no_data(tmp_path: Path) -> None:
    empty = make_sample(0)
    latest = make_result(status="insufficient_data", tests=False, size=0).model_copy(update={"accuracy": []})
    _, page = render(tmp_path, window=empty, latest=latest, history=[])
    assert "<img" not in page
    assert page.count('class="nodata"') == 7  # the tests, the accuracy and the five plots
    assert ">insufficient data</span>" in page and "no feedback labels" in page


def test_a_window_unlike_the_reference_draws_what_it_can(tmp_path: Path) -> None:
    window = make_sample(100, seed=2)
    window = Sample({}, window.probabilities, window.embeddings[:, :8])  # no statistics, other embedding width
    latest = make_result(status="no_reference").model_copy(update={"reference": None, "reasons": ["no profile"]})
    _, page = render(tmp_path, window=window, latest=latest)
    assert page.count("<img") == 3  # class mix, confidence, p-values
    assert page.count('class="nodata"') == 2
    assert ">no reference</span>" in page and "no profile" in page


def test_a_plot_that_fails_is_named_and_spares_the_rest(tmp_path: Path) -> None:
    window = make_sample(100, seed=2)
    window = Sample(window.stats, window.probabilities, window.embeddings[:, 0])  # one number per row, not a vector
    _, page = render(tmp_path, window=window)
    assert page.count("<img") == 4
    assert "could not draw this plot" in page


def test_one_class_and_many_classes_render(tmp_path: Path) -> None:
    _, page = render(tmp_path, classes=["only"], reference=make_sample(200, classes=1), window=make_sample(50, 1))
    assert page.count("<img") == 5
    many = [f"class_{i}" for i in range(60)]
    _, page = render(tmp_path, classes=many, reference=make_sample(400, 60), window=make_sample(100, 60, shift=1))
    assert page.count("<img") == 5


def test_zero_p_values_and_a_single_check_plot(tmp_path: Path) -> None:
    latest = make_result(p=0.0)
    _, page = render(tmp_path, latest=latest, history=[])
    assert page.count("<img") == 5


def test_user_text_is_escaped(tmp_path: Path) -> None:
    _, page = render(tmp_path, model_name="<script>alert(1)</script>", classes=["<b>", "dog", "bird", "fish"])
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


def test_rewrite_replaces_the_report(tmp_path: Path) -> None:
    render(tmp_path, latest=make_result(status="ok"))
    _, page = render(tmp_path)
    assert ">drifted</span>" in page
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_failure_to_write_leaves_no_partial_file(tmp_path: Path) -> None:
    (tmp_path / "report.html").mkdir()  # the output is a folder: the rename into place fails
    with pytest.raises(VisionloopError, match="cannot write the report"):
        render(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert list((tmp_path / "report.html").iterdir()) == []

    blocker = tmp_path / "file"
    blocker.write_text("x")  # the output's folder is a file
    with pytest.raises(VisionloopError, match="cannot write the report"):
        write_report(blocker / "report.html", **inputs())
    assert blocker.read_text() == "x"


def test_live_accuracy_under_the_floor_is_the_verdict_with_its_reason(tmp_path: Path) -> None:
    reason = "live accuracy 0.600 on 50 labels < 0.90 (monitor.min_accuracy; v3)"
    latest = make_result(status="ok").model_copy(update={"status": "accuracy_below_floor", "reasons": [reason]})
    _, page = render(tmp_path, latest=latest)
    assert ">live accuracy below floor</span>" in page  # the badge, in the alarm colour
    assert f"<li>{reason.replace('<', '&lt;')}</li>" in page
    assert "below floor</td></tr>" in page  # the accuracy table's row
