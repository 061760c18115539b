"""report.html from a study: sections, inline plots, the notes for what cannot be drawn yet, the
optional sections a caller fills, and the page as a real browser shows it."""

from __future__ import annotations

import html
import io
import os
import re
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from autoft.searching.report import write_report
from autoft.searching.report_data import Baseline, BestEvaluation, EnsembleSummary, ReportExtras, SearchPlan, Timings, confident_mistakes, per_class_metrics, top_k_accuracy
from autoft.core.text import duration

DISTRIBUTIONS = {"lr": FloatDistribution(1e-5, 1e-2, log=True), "strategy": CategoricalDistribution(["freeze", "l2sp"])}


def _trial(number: int, lr: float, state=TrialState.COMPLETE, **attrs) -> optuna.trial.FrozenTrial:
    curve = [0.5 + 0.1 * e - abs(lr - 1e-3) * 100 for e in range(1, 4)]
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": v, "val_f1_macro": v} for e, v in enumerate(curve, 1)]
    complete = state == TrialState.COMPLETE
    return create_trial(
        state=state,
        value=max(curve) if complete else None,
        params={"lr": lr, "strategy": "freeze" if number % 2 else "l2sp"},
        distributions=DISTRIBUTIONS,
        intermediate_values={e: v for e, v in enumerate(curve, 1)} if state != TrialState.FAIL else {},
        user_attrs={"history": history, **attrs} if complete else attrs,
    )


def _study(trials) -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="colours")
    for t in trials:
        study.add_trial(t)
    return study


def test_report_draws_every_plot_inline(tmp_path: Path):
    trials = [_trial(i, lr) for i, lr in enumerate([1e-3, 3e-4, 2e-3, 5e-3, 1e-4])]
    trials.append(_trial(5, 1e-5, TrialState.PRUNED))
    trials.append(_trial(6, 1e-2, TrialState.FAIL, fail_reason="FloatingPointError: loss is nan <at> epoch 2"))
    path = write_report(_study(trials), tmp_path / "report.html", info={"backbone": "test_resnet", "metric": "accuracy", "space": {"lr": "1e-05 to 0.01 (log)"}}, classes=["red", "green"], confusion=[[5, 1], [0, 6]])
    page = path.read_text()
    sections = page.split("<h2>")[1:]
    plotted = {s.split("</h2>")[0] for s in sections if "<svg" in s}
    assert plotted == {
        "Optimisation history", "Parameters against accuracy", "Parameter importances", "Learning curves of the best trials", "Confusion matrix of the best model",
    }
    assert "accuracy 0.9167" in page  # 11 of 12 on the diagonal
    assert html.escape("FloatingPointError: loss is nan <at> epoch 2") in page and "<at>" not in page
    assert "pruned after epoch 3" in page and "1e-05 to 0.01 (log)" in page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page) and "<script src" not in page  # nothing to fetch


def test_early_report_explains_missing_plots(tmp_path: Path):
    page = write_report(_study([_trial(0, 1e-3)]), tmp_path / "report.html").read_text()
    assert "Parameter importances need at least two completed trials." in page
    assert "Appears once the best trial has finished training." in page
    assert page.count("<svg") == 2  # history and learning curves only


def test_report_of_an_empty_study(tmp_path: Path):
    page = write_report(_study([]), tmp_path / "report.html").read_text()
    assert "No trial has completed yet." in page and "<svg" not in page


# ---------------------------------------------------------------------------
# Durations


def test_durations_read_as_durations(tmp_path: Path):
    assert [duration(s, column=True) for s in (4.23, 42.4, 102, 3599.6, 7500)] == ["4.2s", "42s", "1m42s", "1h00m", "2h05m"]
    assert duration(None, column=True) == ""
    slow = _trial(0, 1e-3)
    slow.datetime_start = slow.datetime_complete - timedelta(seconds=102)
    page = write_report(_study([slow]), tmp_path / "report.html").read_text()
    assert '<td class="number" data-sort="102.0">1m42s</td>' in page and "e+02" not in page


# ---------------------------------------------------------------------------
# The best model, class by class


def test_per_class_metrics_count_top_1_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    metrics = per_class_metrics(labels, np.eye(3)[predicted], ["cat", "dog", "cow"])
    assert [(m.name, m.support) for m in metrics] == [("cat", 2), ("dog", 2), ("cow", 2)]
    assert [round(m.precision, 3) for m in metrics] == [0.5, 0.667, 1.0]
    assert [m.recall for m in metrics] == [0.5, 1.0, 0.5]
    assert metrics[1].f1 == pytest.approx(0.8)


def test_top_5_accuracy_only_with_more_than_5_classes():
    probabilities = np.array([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05], [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]])
    assert top_k_accuracy(np.array([4, 5]), probabilities) == 0.5  # 5th most likely counts, 6th does not
    assert top_k_accuracy(np.array([0]), np.array([[0.5, 0.2, 0.1, 0.1, 0.1]])) is None


def test_the_most_confident_mistakes_come_first_with_thumbnails():
    labels = np.array([0, 1, 2, 0, 1])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.05, 0.9, 0.05], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]])
    images = np.zeros((5, 3, 200, 100), dtype=np.uint8)
    images[:, 0] = np.arange(5)[:, None, None] * 50  # each image its own red
    mistakes = confident_mistakes(labels, probabilities, images, ["red", "green", "blue"])
    assert [(m.index, m.true_label, m.predicted_label, m.confidence) for m in mistakes] == [(2, "blue", "green", 0.9), (3, "red", "blue", 0.7), (1, "green", "red", 0.6)]
    thumbnail = Image.open(io.BytesIO(mistakes[0].thumbnail_png))
    assert thumbnail.size == (48, 96) and thumbnail.getpixel((10, 10))[0] == 100  # shrunk to 96 px, aspect kept, image 2's pixels
    assert len(confident_mistakes(labels, probabilities, None, ["red", "green", "blue"], limit=2)) == 2
    grey = confident_mistakes(labels, probabilities, images[:, :1], ["red", "green", "blue"])[0]
    assert Image.open(io.BytesIO(grey.thumbnail_png)).mode == "L"


def test_the_mistakes_of_a_set_on_disk_read_only_the_images_shown():
    import torch

    from autoft.data import ImageTensors

    labels = np.array([0, 1, 2, 0, 1])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.05, 0.9, 0.05], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]])
    pixels = torch.arange(5, dtype=torch.uint8).mul(50).view(5, 1, 1, 1).expand(5, 3, 8, 8).contiguous()
    taken = []

    class Recorded(ImageTensors):  # stands in for a set on disk: what it reads is recorded
        def take(self, index):
            taken.append(list(index))
            return super().take(index)

    from_disk = confident_mistakes(labels, probabilities, Recorded(pixels), ["red", "green", "blue"], limit=2)
    assert taken == [[2, 3]]
    assert [m.thumbnail_png for m in from_disk] == [m.thumbnail_png for m in confident_mistakes(labels, probabilities, pixels.numpy(), ["red", "green", "blue"], limit=2)]


# ---------------------------------------------------------------------------
# Everything the caller can add


CLASSES = [f"class {i}" for i in range(10)]


def evaluation(n: int = 60, seed: int = 0) -> BestEvaluation:
    """Ten classes, most images right, a few confidently wrong; images whose colour follows the label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    logits = rng.normal(0, 1, (n, 10))
    logits[np.arange(n), labels] += 4
    logits[np.arange(6), (labels[:6] + 1) % 10] += 8  # six confident mistakes
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = (labels * 25)[:, None, None]
    images[:, 2, 8:24, 8:24] = 200
    return BestEvaluation(labels, probabilities, CLASSES, images)


def full_extras() -> ReportExtras:
    return ReportExtras(
        plan=SearchPlan(image_size=32, epochs=6, steps_per_epoch=23, trials=12, pretraining="autoencoder, 12 epochs", time_budget_s=1800),
        timings=Timings(decoding=3.2, pretraining=13.0, trials=102.0, refit=None, export=4.1),
        baselines=[Baseline("logistic regression on pixels", 0.881, "scikit-learn, 8x8 pixels")],
        ensemble=EnsembleSummary(members=(3, 7, 9), value=0.9912, latency_ms=12.3, single_latency_ms=4.1, batch_size=32),
        best_eval=evaluation(),
    )


def test_every_optional_section_renders(tmp_path: Path):
    trials = [_trial(i, lr) for i, lr in enumerate([1e-3, 3e-4, 2e-3])]
    page = write_report(_study(trials), tmp_path / "report.html", extras=full_extras()).read_text()
    references = page.split("<h2>Against reference models</h2>")[1].split("</section>")[0]
    assert references.index("ensemble of trials 3, 7, 9") < references.index("logistic regression on pixels") < references.index("best trial (0)")  # by value
    assert "0.8810" in references and "latency 12.3 ms vs 4.1 ms for the best single model per batch of 32 (3.0x)" in references
    assert "<th>image size</th><td>32 px</td>" in page and "<th>time budget</th><td>30m00s</td>" in page and "refit" not in page
    assert "<th>wall time</th><td>2m02s</td>" in page  # 3.2 + 13 + 102 + 4.1 s
    assert '<td>trials</td><td class="number" data-sort="102.0">1m42s</td>' in page and "83%" in page  # 102 of 122.3 s
    assert "<th>top-5 accuracy</th>" in page and page.count("<tr><td>class ") == 10
    gallery = page.split('<div class="gallery">')[1].split("</div>")[0]
    assert gallery.count('src="data:image/png;base64,') == 6 and "true <b>class 0</b><br>predicted <b>class 1</b>" in gallery
    assert "Appears once the best trial has finished training." not in page  # the confusion matrix comes from the evaluation


def test_a_report_with_no_extras_says_what_is_missing(tmp_path: Path):
    page = write_report(_study([_trial(0, 1e-3), _trial(1, 3e-4)]), tmp_path / "report.html").read_text()
    assert "Against reference models" not in page and "<h2>Plan</h2>" not in page and "Where the time went" not in page
    assert page.count("Appears once the best model has been evaluated on held-out images.") == 2  # per-class table, gallery
    few = ReportExtras(best_eval=BestEvaluation(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"]))
    page = write_report(_study([_trial(0, 1e-3)]), tmp_path / "report.html", extras=few).read_text()
    assert "top-5" not in page and "No mistakes on the 2 validation images." in page


# ---------------------------------------------------------------------------
# In a real browser: Debian's Chromium, driven by Playwright (no browser download)

CHROMIUM = os.environ.get("AUTOFT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def test_the_report_renders_in_a_headless_browser(tmp_path: Path):
    if not Path(CHROMIUM).is_file():  # CI installs it: a missing browser is a failure, never a skip
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium`, or set AUTOFT_CHROMIUM to its path")
    from playwright.sync_api import sync_playwright

    trials = [_trial(i, lr) for i, lr in enumerate([1e-3, 3e-4, 2e-3, 5e-3, 1e-4, 7e-4])]
    trials.append(_trial(6, 1e-5, TrialState.PRUNED))
    trials.append(_trial(7, 1e-2, TrialState.FAIL, fail_reason="FloatingPointError: loss is nan"))
    report = write_report(_study(trials), tmp_path / "report.html", info={"backbone": "test_resnet", "metric": "accuracy"}, extras=full_extras())
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, chromium_sandbox=False)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}") if message.type in ("error", "warning") else None)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"failed to load {request.url}"))
            page.goto(report.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "all => all.map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])")
            plots = page.eval_on_selector_all("section figure > svg", "all => all.map(s => s.getBoundingClientRect().width * s.getBoundingClientRect().height)")
            headings = page.eval_on_selector_all("h2", "all => all.map(h => h.textContent)")
            page.click("#trials thead th:nth-child(3)")  # the accuracy column, ascending
            ascending = _column(page, "#trials", 3)
            page.click("#trials thead th:nth-child(3)")
            descending = _column(page, "#trials", 3)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert len(images) == 6 and all(done and natural == 32 and shown >= 96 for done, natural, shown in images), images
    assert len(plots) == 5 and all(area > 10_000 for area in plots), plots  # confusion, history, slice, importances, curves
    assert {"Against reference models", "Plan", "Where the time went", "Most confident mistakes of the best model"} <= set(headings)
    values = [float(v) for v in ascending if v]
    assert values == sorted(values) and ascending[-2:] == ["", ""]  # the pruned and failed trials have no value: last
    assert [float(v) for v in descending if v] == sorted(values, reverse=True) and descending[-2:] == ["", ""]
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000


def _column(page, table: str, column: int) -> list[str]:
    return page.eval_on_selector_all(f"{table} tbody tr td:nth-child({column})", "all => all.map(c => c.textContent.trim())")
