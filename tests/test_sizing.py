"""The image size from pretrained weights, measured by a linear probe at each size the budget affords."""

from pathlib import Path

import numpy as np
import pytest
import torch

from autoft.searching.calibration import TIE, SizeProbe
from autoft.searching.planning import DataShape, Overrides, Throughput, affordable_sizes, make_plan
from autoft.searching.sizing import PROBE_IMAGES, measure_sizes

DIGITS = DataShape(labelled=1797, val=360, smallest_class=174, smallest_val_class=35, classes=10, undecoded=1797, source_side=32)
RATES = {s: Throughput(s, 4000.0 * (32 / s) ** 2, 16000.0 * (32 / s) ** 2) for s in (32, 64, 224)}  # cost ~ pixels


def test_the_best_probe_wins_and_a_tie_goes_to_the_larger_size():
    probe = SizeProbe({32: 0.80, 64: 0.90, 224: 0.85}, 500, 4.0)
    assert probe.choose([32, 64, 224]) == 64
    assert probe.choose([32, 224]) == 224  # only among the sizes offered
    assert SizeProbe({32: 0.90 + TIE, 64: 0.90 + TIE / 2, 224: 0.90}).choose([32, 64, 224]) == 224  # within TIE of the best: the features' scale
    assert SizeProbe({32: 0.90, 64: 0.90 + 2 * TIE, 224: 0.90}).choose([32, 64, 224]) == 64  # beyond it the probe decides
    assert probe.choose([64]) is None and probe.choose([64, 128]) is None  # fewer than two measured: nothing to choose


def test_the_plan_takes_the_probes_size_among_those_it_affords_and_says_what_it_read():
    assert affordable_sizes(DIGITS, RATES, 3600, pretrained=True) == [32, 64, 224]
    assert make_plan(DIGITS, RATES, 3600, pretrained=True).image_size == 224  # unmeasured: the largest affordable, as before
    probe = SizeProbe({32: 0.80, 64: 0.90, 224: 0.85}, 500, 4.0)
    plan = make_plan(DIGITS, RATES, 3600, pretrained=True, probe=probe)
    assert plan.image_size == 64 and "64 px by a linear probe of the starting weights on 500 images: 0.80 at 32 px, 0.90 at 64 px, 0.85 at 224 px (4s)" in plan.line()
    assert affordable_sizes(DIGITS, RATES, 300, pretrained=True) == [32, 64]
    best_unaffordable = SizeProbe({32: 0.80, 64: 0.70, 224: 0.95}, 500, 4.0)
    assert make_plan(DIGITS, RATES, 300, pretrained=True, probe=best_unaffordable).image_size == 32  # 224 reads best but 5m cannot train it
    tie = make_plan(DIGITS, RATES, 3600, pretrained=True, probe=SizeProbe({32: 0.905, 64: 0.900}, 500, 4.0))
    assert tie.image_size == 64 and "; within 0.01 of the best, the larger size)" in tie.line()


def test_the_probe_never_picks_a_size_below_the_images_own():
    below = SizeProbe({16: 0.99, 32: 0.80, 64: 0.85}, 500, 4.0)  # a smaller size read better: not a candidate
    assert make_plan(DIGITS, RATES, 3600, pretrained=True, probe=below).image_size == 64
    assert min(affordable_sizes(DIGITS, RATES, 3600, pretrained=True)) == 32 == min(RATES)


def test_a_probe_that_was_not_affordable_says_so_and_the_stages_choose():
    skipped = SizeProbe({}, 500, skipped="500 images at 32, 64 px need 20s, over 9s")
    plan = make_plan(DIGITS, RATES, 3600, pretrained=True, probe=skipped)
    assert plan.image_size == 224 and "skipped the size probe (500 images at 32, 64 px need 20s, over 9s)" in plan.line()
    decoded = make_plan(DIGITS, RATES, 3600, Overrides(image_size=64), pretrained=True, probe=SizeProbe({32: 0.8, 64: 0.9}, 500, 4.0))
    assert "64 px by a linear probe" in decoded.line()  # planned again at the size decoded: the line keeps what was measured


class Folder:
    """A dataset plugin's labelled images: files, labels, and a test split the probe must not read."""

    def __init__(self, root: Path, mostly_test: bool = False):
        self.classes = sorted(p.name for p in root.iterdir())
        self.samples = [f for c in self.classes for f in sorted((root / c).glob("*.png"))]
        self.labels = [self.classes.index(f.parent.name) for f in self.samples]
        # mostly_test: one training image a class (24 a class in the folder), every other one in the test split
        self.splits = ["test" if i % 24 else "train" for i in range(len(self.samples))] if mostly_test else None


def test_measuring_reads_each_size_within_its_limit_and_never_the_test_split(image_folder):
    from autoft.training.candidates import Probe

    embed = lambda: Probe.build("test_resnet", None, 4, seed=0).embed  # noqa: E731
    measured = measure_sizes(Folder(image_folder), [32, 48], RATES, embed, limit=60.0, seed=0)
    assert set(measured.accuracies) == {32, 48} and all(0.0 <= a <= 1.0 for a in measured.accuracies.values())
    assert measured.images == 96 <= PROBE_IMAGES and 0 < measured.seconds < 60 and measured.skipped is None
    assert measured.accuracies[32] > 0.5  # four noisy colours: random features still tell them apart
    too_dear = measure_sizes(Folder(image_folder), [32, 48], RATES, lambda: pytest.fail("measured over its limit"), limit=0.01, seed=0)
    assert too_dear.accuracies == {} and too_dear.skipped.startswith("96 images at 32, 48 px need ") and too_dear.skipped.endswith(", over 0s")
    few = measure_sizes(Folder(image_folder, mostly_test=True), [32, 48], RATES, lambda: pytest.fail("measured too few"), limit=None, seed=0)
    assert few.images == 4 and few.skipped == "4 labelled images of 4 classes are too few to rank sizes by"  # only the 4 train images were drawn


def test_a_search_from_pretrained_weights_measures_the_size_and_its_plan_line_says_so(image_folder, tmp_path):
    from autoft.model.backbones import build_backbone
    from autoft.searching.config import SearchConfig
    from autoft.searching.preparing import prepare

    torch.manual_seed(0)
    torch.save(build_backbone("test_resnet", num_classes=4).model.state_dict(), tmp_path / "start.pt")
    # Two jobs: calibration and the probe run on one thread each, as a worker's trials would. On two cores shared with
    # other work, two torch threads fight for them (a step 200 times slower), and calibration stops at the first size.
    config = SearchConfig("test_resnet", str(image_folder), tmp_path / "run", device="cpu", weights=str(tmp_path / "start.pt"), seed=0, jobs=2)
    session = prepare(config)
    line = session.ctx.plan.line()
    assert " px by a linear probe of the starting weights on 96 images: " in line and "at 32 px, " in line, line
    assert session.ctx.plan.image_size >= 32 and session.state.timings["size probe"] > 0
    assert np.isfinite(session.state.timings["size probe"])


def test_a_size_the_probe_reads_better_is_trained_even_when_it_buys_fewer_trials():
    """At 2m, 64 px holds the default fit and the refit at full strength but a smaller search than
    32 px: unmeasured, the plan keeps 32 px; measured better by the probe, it trains 64 px."""
    assert affordable_sizes(DIGITS, RATES, 120, pretrained=True) == [32, 64]
    assert make_plan(DIGITS, RATES, 120, pretrained=True).image_size == 32
    better = make_plan(DIGITS, RATES, 120, pretrained=True, probe=SizeProbe({32: 0.80, 64: 0.90}, 500, 4.0))
    assert better.image_size == 64 and better.default_fit and better.refit and better.default_steps == better.wanted_steps
    assert make_plan(DIGITS, RATES, 120, pretrained=True, probe=SizeProbe({32: 0.90, 64: 0.80}, 500, 4.0)).image_size == 32
