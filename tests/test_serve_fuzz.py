"""A live ``autoft serve`` fuzzed (benchmarks/serve_fuzz.py, bounded in count and time):
no response 5xx, the server live after every request, its memory flat after the bombs."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # serve_fuzz imports serve_load, beside it
_spec = importlib.util.spec_from_file_location("serve_fuzz", BENCHMARKS / "serve_fuzz.py")
serve_fuzz = sys.modules["serve_fuzz"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_fuzz)


def test_the_bomb_is_a_13000_pixel_square_in_20_kb():
    bomb = serve_fuzz.bomb_png()
    assert len(bomb) < 25_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(io.BytesIO(bomb)) as image:  # under Pillow's error limit
        assert image.size == (13_000, 13_000)


def test_no_request_gets_a_5xx_stops_the_server_or_grows_its_memory(digits_onnx):
    summary = serve_fuzz.run(digits_onnx, examples=100, seconds=90)
    serve_fuzz.report(summary)  # shown with pytest -s
    tally = summary.tally
    assert tally.classes["5xx"] == 0 and tally.classes["no answer"] == 0, tally.server_errors[:5]
    assert summary.live, f"the server stopped answering after: {tally.dead_after}"
    assert tally.classes["2xx"] > 0 and tally.classes["4xx"] > 0 and tally.tried > 30
    assert summary.attacks == {
        "8 bombs at once": [413] * 8,
        "bomb upload to /predict": [413],
        "300,000 tiny images": [413],
        "20,000 tiny images": [413],
    }
    assert summary.after_attacks_rss_mib <= 1.5 * summary.idle_rss_mib
    assert summary.peak_rss_mib <= 1.5 * summary.idle_rss_mib


def test_load_scenarios_answer_every_attempt_and_the_normal_client_within_a_second(digits_onnx):
    overload, slowloris = serve_fuzz.run_load(digits_onnx, ["overload", "slowloris"], seconds=4, serve_args=("--max-queue", "64", "--header-timeout", "1"))
    for result in (overload, slowloris):
        serve_fuzz.report_load(result)  # shown with pytest -s
        assert result.failures == []
    assert overload.statuses["no answer"] == 0 and overload.statuses["200"] > 0 and overload.statuses["503 busy"] > 0
    assert slowloris.statuses["200"] > 0 and max(slowloris.latencies["200"]) < 1.0
    assert slowloris.closed_idle >= 64  # each idle connection closed after its second, and reopened
