"""The anytime search: the simple models are candidates that ship when they win, the default
recipe's fit comes first, and a budget that holds only the simple models still ships one."""

from __future__ import annotations

import dataclasses
import json
import re

import httpx
import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner

import autoft.searching.preparing as preparing
from autoft.model.checkpoints import load_checkpoint
from autoft.cli import make_app
from autoft.deploy.inference import OnnxClassifier
from autoft.searching import search
from autoft.searching.storage import open_storage
from autoft.deploy.serving import ServeConfig, create_app

PIXELS = "logistic regression on pixels"


@pytest.fixture(scope="module")
def colours_120(tmp_path_factory):
    """Four noisy colours, 30 images each: enough held-out images (100 or more) for simple models to join an ensemble."""
    from conftest import NOISY_COLOURS

    root = tmp_path_factory.mktemp("colours120")
    rng = np.random.default_rng(1)
    for name, colour in NOISY_COLOURS.items():
        (root / name).mkdir()
        for i in range(30):
            Image.fromarray(np.clip(np.array(colour) + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _trials(result) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=result.study_name, storage=open_storage(result.storage))
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def test_a_simple_model_that_beats_every_trial_ships_exported_and_served(image_folder, tmp_path, live_app):
    """Trials that cannot learn (a learning rate of 1e-9) lose to logistic regression on the
    colours' pixels: the search ships that model, through the same export, and it serves."""
    result = search(
        "test_resnet", str(image_folder), tmp_path / "run", trials=1, epochs=1, image_size=16, device="cpu", batch_size=8, no_cv=True, ensemble=1,
        ranges=["lr=1e-9"], refit=False,
    )
    metrics = result.metrics
    (trial,) = [t for t in _trials(result) if t.state == TrialState.COMPLETE]
    assert metrics["model"]["candidate"] == PIXELS and result.best_number is None and metrics["trial"] is None
    assert metrics["value"] > trial.value and result.best_value == metrics["value"]
    assert f"{PIXELS} ships: it scored" in metrics["summary"] and f"best trial ({trial.number})" in metrics["summary"]
    assert load_checkpoint(result.best_dir).meta["params"] == {"candidate": PIXELS}
    assert json.loads((result.best_dir / "export.json").read_text())["checks"]  # the export's own verification ran

    classifier = OnnxClassifier.load(result.best_dir, device="cpu")
    address = live_app(create_app(classifier, ServeConfig(max_batch=4, max_delay_ms=5)))
    for name in ("red", "green"):
        png = next((image_folder / name).glob("*.png")).read_bytes()
        with httpx.Client(base_url=f"http://{address}", timeout=30) as http:
            reply = http.post("/predict?top_k=1", files={"file": ("x.png", png, "image/png")})
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"][0]["label"] == name


def test_a_model_whose_export_fails_verification_gives_way_to_its_best_member_alone_that_exports(image_folder, tmp_path, monkeypatch):
    """A search never ends without a model for want of one export: an ensemble whose ONNX graph
    onnxruntime runs apart from PyTorch (gray scenes: tied neighbours ranked apart) ships its best
    member alone, verified, and says why; when no member exports either, a simple model does."""
    from autoft.deploy import exporting
    from autoft.errors import AutoftError
    from autoft.model.ensemble import AveragedMembers, EnsembleChoice
    from autoft.searching import runner
    from autoft.searching.finishing import build_final

    checked, refused = exporting._checked, []

    def apart(path, net, images, precision, refuse=lambda net: isinstance(net, AveragedMembers)):
        if refuse(net):
            refused.append(type(net).__name__)
            raise AutoftError("onnxruntime differs from PyTorch by 0.0767 (allowed 0.0001)")
        return checked(path, net, images, precision)

    def ensemble(session, best, trials, states):
        weights = {best.number: 0.6, PIXELS: 0.4}
        return build_final(session, best, weights, choice=EnsembleChoice(weights, float(best.value), best.number, float(best.value)))

    monkeypatch.setattr(exporting, "_checked", apart)
    monkeypatch.setattr(runner, "_final_model", ensemble)
    run = dict(trials=1, epochs=1, image_size=16, device="cpu", batch_size=8, no_cv=True, refit=False, seed=0)
    result = search("test_resnet", str(image_folder), tmp_path / "run", **run)
    (trial,) = [t for t in _trials(result) if t.state == TrialState.COMPLETE]
    pixels = next(b["value"] for b in result.metrics["baselines"] if b["name"] == PIXELS)
    alone = trial.number if trial.value >= pixels else PIXELS  # the better of the two on the same split
    assert refused == ["AveragedMembers", "AveragedMembers"]  # dynamo, then TorchScript
    model = result.metrics["model"]
    assert (model["members"] or [model["candidate"]]) == [alone] and result.metrics["value"] == pytest.approx(max(trial.value, pixels))
    assert any("the ensemble of 2 failed its export (export failed verification with every exporter" in n for n in result.metrics["notes"])
    assert json.loads((result.best_dir / "export.json").read_text())["checks"]["fp32"]  # verified, as any model shipped
    assert not list((tmp_path / "run").glob(".best.*"))  # the failed staging folder is gone

    def nothing_but_pixels(path, net, images, precision):  # every network with a convolution runs apart: the trial, the probe
        return apart(path, net, images, precision, refuse=lambda net: any(isinstance(m, torch.nn.Conv2d) for m in net.modules()))

    monkeypatch.setattr(exporting, "_checked", nothing_but_pixels)
    monkeypatch.setattr(runner, "_final_model", lambda session, best, trials, states: build_final(session, best, {best.number: 1.0}))
    result = search("test_resnet", str(image_folder), tmp_path / "again", **run)
    (trial,) = [t for t in _trials(result) if t.state == TrialState.COMPLETE]
    assert result.metrics["model"]["candidate"] == PIXELS and (result.best_dir / "model.onnx").is_file()
    assert next(n for n in result.metrics["notes"] if "failed its export" in n).startswith(f"trial {trial.number} failed its export")


def test_the_default_recipe_is_fitted_first_on_the_same_folds_as_every_trial(image_folder, tmp_path):
    """The default recipe runs before any other trial and is scored on the same folds: a score
    on one fold against the others' means would let its noise win the selection."""
    result = search("test_resnet", str(image_folder), tmp_path, trials=3, epochs=2, image_size=16, device="cpu", batch_size=8, cv=2, pruner="none", ensemble=1, export_onnx=False)
    default, *others = _trials(result)
    assert default.user_attrs["recipe"] == "default" and default.state == TrialState.COMPLETE
    assert sorted(default.intermediate_values) == [0, 1] and len(default.user_attrs["fold_scores"]) == 2
    assert others and all(len(t.user_attrs["fold_scores"]) == 2 for t in others if t.state == TrialState.COMPLETE)
    assert all(default.datetime_start <= t.datetime_start for t in others)


def test_a_budget_that_holds_only_the_simple_models_ships_one_instead_of_refusing(tmp_path):
    """Large images on a CPU with 20 seconds: no fine-tune of resnet18 fits, logistic regression does."""
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 40, 40), (40, 40, 220)]):
        for i in range(6):
            pixels = np.clip(rng.normal(colour, 20, (160, 160, 3)), 0, 255).astype(np.uint8)
            (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.png")
    result = CliRunner().invoke(make_app(), ["search", "--backbone", "resnet18", "--data", str(folder), "--out", str(tmp_path / "run"), "--timeout", "20s", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "plan: only the simple models" in result.output
    done = " ".join(result.output[result.output.index("done:") :].split())
    assert "(;" not in done and re.search(r"the same splits \(\d+s\)", done), done  # no trials: the seconds alone
    metrics = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert metrics["model"]["candidate"] in (PIXELS, "linear probe on random resnet18 features") and metrics["trial_states"] == {}
    assert (tmp_path / "run" / "best" / "model.onnx").is_file()


def test_the_linear_probe_is_a_candidate_exactly_when_the_plan_bought_it(image_folder, tmp_path, monkeypatch):
    """One decision, the plan's, priced by the measured evaluation rate: the search used to drop
    a probe the plan had bought by a cruder rule of its own (gray scenes at 1m: 4,391 images)."""
    real = preparing.make_plan
    for bought in (True, False):
        monkeypatch.setattr(preparing, "make_plan", lambda *a, bought=bought, **k: dataclasses.replace(real(*a, **k), probe=bought))
        result = search("test_resnet", str(image_folder), tmp_path / f"run-{bought}", trials=1, epochs=1, image_size=16, device="cpu", batch_size=8, no_cv=True, ensemble=1, refit=False)
        names = [b["name"] for b in result.metrics["baselines"]]
        assert any(name.startswith("linear probe") for name in names) == bought, names


def test_a_simple_model_ships_over_the_network_only_when_the_images_vouch_for_its_lead(registry):
    """A candidate right on one image more of 20 leads on 64% of their bootstrap resamples: the
    trained network ships, and the notes say why; right on six more, the candidate ships. On
    20 validation images logistic regression read 0.35 against the default recipe's 0.30 and
    shipped, and scored 0.241 on the test images (gray-scenes-20, 20 classes, 1m)."""
    from types import MethodType, SimpleNamespace

    from autoft.searching.selection import judge
    from autoft.training.candidates import Candidate

    labels = np.arange(20) % 2
    index = np.arange(100, 120)  # the pool images scored: the candidates held out these and more
    def probabilities(right: int) -> np.ndarray:  # right on the first ``right`` images
        guess = np.where(np.arange(20) < right, labels, 1 - labels)
        return np.eye(2)[guess] * 0.8 + 0.1

    def session(right: int):
        pool = np.arange(200)
        held = np.zeros((200, 2))
        held[index] = probabilities(right)
        candidate = SimpleNamespace(name="logistic regression on pixels", value=right / 20, index=pool, probabilities=held)
        candidate.predicted = MethodType(Candidate.predicted, candidate)
        labels_of_pool = torch.zeros(200, dtype=torch.long)
        labels_of_pool[index] = torch.from_numpy(labels)
        return SimpleNamespace(ctx=SimpleNamespace(candidates=(candidate,), registry=registry, pool=SimpleNamespace(labels=labels_of_pool),
                                                   config=SimpleNamespace(metric="accuracy", simple_models=True)), state=SimpleNamespace(notes=[]))  # fmt: skip

    network = (index, probabilities(14))  # 0.70
    close = session(15)
    assert judge(close, 0.70, "best trial (0)", network).candidate is None
    assert "above it on 6" in close.state.notes[-1] and "too unsure a lead" in close.state.notes[-1]  # 64% (1 - 0.95 ** 20) of the resamples
    assert judge(session(15), 0.70, "best trial (0)").candidate is not None  # without the evidence, any lead ships it
    sure = session(20)
    verdict = judge(sure, 0.70, "best trial (0)", network)
    assert verdict.candidate.value == 1.0 and "ships: it scored 1.0000" in verdict.reason and not sure.state.notes
    elsewhere = session(20)
    elsewhere.ctx.candidates[0].index = np.arange(100, 110)  # it did not predict every image the network was scored on: its lead is taken as it is
    elsewhere.ctx.candidates[0].probabilities = elsewhere.ctx.candidates[0].probabilities[100:110]
    assert judge(elsewhere, 0.70, "best trial (0)", network).candidate is not None


def test_steps_are_timed_at_the_batch_the_fits_train_with(image_folder, tmp_path, monkeypatch):
    """A step's fixed costs weigh more in a small batch: a rate measured at 32 priced the steps
    of 16 that small sets train with 1.6 times too cheap (resnet18, 32 px, 2 cores)."""
    real, timed = preparing.calibrate, []
    monkeypatch.setattr(preparing, "calibrate", lambda make_model, sizes, batch_size, *a, **k: timed.append(batch_size) or real(make_model, sizes, batch_size, *a, **k))
    result = search("test_resnet", str(image_folder), tmp_path / "run", trials=1, epochs=1, device="cpu", no_cv=True, ensemble=1, refit=False, timeout="10m")
    assert timed == [result.metrics["plan"]["batch_size"]] == [16]  # a few dozen images: batches of 16


def test_a_tie_ships_the_trained_network_and_a_loss_for_log_loss_is_a_lower_value(registry):
    """Selection is strict, in the metric's own direction: a candidate ships only when it is better."""
    from types import SimpleNamespace

    from autoft.searching.selection import judge

    def session(metric: str, *values: float, simple: bool = True):
        candidates = tuple(SimpleNamespace(name=f"simple {v}", value=v) for v in values)
        return SimpleNamespace(ctx=SimpleNamespace(candidates=candidates, registry=registry, config=SimpleNamespace(metric=metric, simple_models=simple)))

    assert judge(session("accuracy", 0.9, 0.8), 0.9, "best trial (0)").candidate is None  # a tie: the network
    assert judge(session("accuracy", float(np.mean([0.85, 0.9, 0.7]))), float(np.mean([0.85, 0.95, 0.65])), "best trial (0)").candidate is None  # to the last bits
    assert judge(session("accuracy", 0.91, 0.8), 0.9, "best trial (0)").candidate.value == 0.91
    assert judge(session("accuracy", 0.5), None, "").candidate.value == 0.5  # nothing trained: the simple model, never nothing
    assert judge(session("log_loss", 0.3, 0.5), 0.4, "best trial (0)").candidate.value == 0.3  # lower is better
    assert judge(session("log_loss", 0.5), 0.4, "best trial (0)").candidate is None
    assert judge(session("accuracy"), 0.4, "best trial (0)").candidate is None  # no candidates at all
    assert judge(session("accuracy", 0.95, simple=False), 0.4, "best trial (0)").candidate is None  # --no-simple-models


def test_from_pretrained_weights_the_default_recipe_is_lp_ft_at_a_low_learning_rate(image_folder, tmp_path):
    import torch

    from autoft.model.backbones import build_backbone

    weights = tmp_path / "start.pt"
    torch.save(build_backbone("test_resnet", num_classes=3).model.state_dict(), weights)
    result = search("test_resnet", str(image_folder), tmp_path / "run", trials=1, epochs=1, image_size=16, device="cpu", batch_size=8, no_cv=True,
                    ensemble=1, export_onnx=False, weights=str(weights))  # fmt: skip
    (default,) = _trials(result)
    assert default.user_attrs["recipe"] == "default" and default.params["strategy"] == "lp-ft" and default.params["lr"] == pytest.approx(3e-4)
    assert default.params["lr_decay"] == 1.0 and default.params["bn"] == "keep"  # stated, and searched by later trials


def test_no_time_is_kept_back_for_a_refit_the_plan_did_not_buy():
    """A plan that skipped the refit must not starve its own default fit by reserving for it."""
    from types import SimpleNamespace

    from autoft.core.budget import Budget
    from autoft.searching.session import SearchState, Session

    def session(refit: bool) -> Session:
        plan = SimpleNamespace(refit=refit, refit_seconds=47.0, fit_seconds=38.0, steps=150, finish_seconds=3.0)
        ctx = SimpleNamespace(plan=plan, config=SimpleNamespace(refit=True), budget=Budget.of(50.0))
        return Session(ctx, SearchState(study=None))

    assert session(refit=False).refit_reserve() == 0.0 and 45 < session(refit=False).trials_budget().left() <= 47  # the end's 3 s kept
    assert session(refit=True).refit_reserve() == pytest.approx(1.2 * 47.0) and session(refit=True).trials_budget().left() < 0  # a fifth to spare


def test_time_kept_for_the_refit_follows_the_fits_pace_slower_or_faster():
    """The plan's prices hold until fits have run; then the median fit's pace, either way."""
    from types import SimpleNamespace

    from autoft.core.budget import Budget
    from autoft.searching.planning import BUILD_SECONDS
    from autoft.searching.session import SearchState, Session

    def session(fits) -> Session:
        plan = SimpleNamespace(refit=True, refit_seconds=47.0, fit_seconds=38.0, steps=150, finish_seconds=3.0)
        ctx = SimpleNamespace(plan=plan, config=SimpleNamespace(refit=True), budget=Budget.of(300.0))
        return Session(ctx, SearchState(study=None, fits=list(fits)))

    assert session([]).fit_seconds() == 38.0 and session([]).refit_reserve() == pytest.approx(1.2 * 47.0)
    faster = session([(10.0, 150), (12.0, 150), (30.0, 300)])  # paces 0.067, 0.08, 0.1 s a step: the median 0.08
    assert faster.fit_seconds() == pytest.approx(BUILD_SECONDS + 12.0) and faster.seconds_per_step() == pytest.approx((BUILD_SECONDS + 12.0) / 150)
    assert faster.refit_reserve() == pytest.approx(1.2 * (BUILD_SECONDS + 12.0) * 47.0 / 38.0)
    slower = session([(90.0, 150)])
    assert slower.fit_seconds() == pytest.approx(BUILD_SECONDS + 90.0) and slower.refit_reserve() > 1.2 * 47.0


def test_the_default_recipe_trains_on_pseudo_labels_only_when_spreading_beats_every_simple_model():
    from types import SimpleNamespace

    from autoft import plugins
    from autoft.searching.trials import spread_helps
    from autoft.training.candidates import SPREAD_NAME

    probe = "linear probe on random resnet18 features"
    spread_probe = f"{probe} and spread labels"

    def session(student: float | None, pixels: float, metric: str = "accuracy", probed: float | None = None, spread_probed: float | None = None):
        found = [SimpleNamespace(name=PIXELS, value=pixels, spread=False)] + ([SimpleNamespace(name=SPREAD_NAME, value=student, spread=True)] if student is not None else [])
        found += [SimpleNamespace(name=probe, value=probed, spread=False)] if probed is not None else []
        found += [SimpleNamespace(name=spread_probe, value=spread_probed, spread=True)] if spread_probed is not None else []
        return SimpleNamespace(ctx=SimpleNamespace(candidates=found, registry=plugins.registry(), config=SimpleNamespace(metric=metric)))

    assert spread_helps(session(0.92, 0.92)) == (True, None)  # no worse: the spread labels add what pixels know
    student, pixels = float(np.mean([0.85, 0.95, 0.65])), float(np.mean([0.85, 0.9, 0.7]))  # the same mean over 3 folds of 20 images ...
    assert student < pixels and spread_helps(session(student, pixels))[0]  # ... but for the last bits: still a tie
    helps, why = spread_helps(session(0.20, 0.45))  # spread labels below chance
    assert not helps and why == f"the default recipe trains without pseudo-labels: {SPREAD_NAME} scored 0.2000, below {PIXELS}'s 0.4500"
    helps, why = spread_helps(session(0.45, 0.40, probed=0.70))  # textures: above the pixels, far below the probe
    assert not helps and why == f"the default recipe trains without pseudo-labels: {SPREAD_NAME} scored 0.4500, below {probe}'s 0.7000"
    assert spread_helps(session(0.88, 0.85, probed=0.60)) == (True, None)  # the best simple model: its labels teach
    assert spread_helps(session(None, 0.45)) == (True, None)  # no student (simple models off): as before
    assert spread_helps(session(0.9, 0.5, metric="log_loss"))[0] is False  # a loss: lower is better
    assert spread_helps(session(0.3, 0.5, metric="log_loss", probed=0.4)) == (True, None)
    # From pretrained weights the probe on spread labels learns from them too: its lead is theirs, not a rival's
    assert spread_helps(session(0.75, 0.60, probed=0.95, spread_probed=0.97)) == (True, None)
    helps, why = spread_helps(session(0.30, 0.25, probed=0.62, spread_probed=0.58))  # gray scenes: spread badly, below the probe
    assert not helps and why == f"the default recipe trains without pseudo-labels: {spread_probe} scored 0.5800, below {probe}'s 0.6200"


def test_a_plan_without_a_search_runs_more_trials_only_where_one_split_can_choose_among_them():
    from types import SimpleNamespace

    from autoft.searching.trials import trial_cap

    def session(val: int, *, search: bool = False, folds: int | None = None, no_cv: bool = False, trials: int | None = None):
        plan = SimpleNamespace(default_fit=True, search=search, folds=folds)
        config = SimpleNamespace(trials=trials, seconds=120.0, no_cv=no_cv)
        return SimpleNamespace(ctx=SimpleNamespace(config=config, plan=plan, splits=[(np.arange(240), np.arange(val))]))

    assert trial_cap(session(60)) == 1  # 60 validation images: the default fit alone
    assert trial_cap(session(360)) is None  # enough to choose on: trials while time remains
    assert trial_cap(session(60, no_cv=True)) is None  # one split asked for
    assert trial_cap(session(60, search=True)) is None  # a search the plan bought
    assert trial_cap(session(60, trials=3)) == 3  # --trials is taken as given


def test_a_simple_model_is_an_ensemble_member_on_the_trials_own_evidence(colours_120, image_folder, tmp_path, monkeypatch):
    """The simple models' held-out predictions sit beside the trials' for the same images, and
    an ensemble holding one ships as one exported model: the refit network and the simple
    model fitted on every labelled image, averaged. Its serving latency is measured, or a note
    says why not."""
    import torch

    import autoft.searching.publishing as publishing
    from autoft.deploy.exporting import ExportFailed
    from autoft.searching.config import SearchConfig
    from autoft.searching.finishing import best_trial, build_final, member_evidence
    from autoft.searching.publishing import publish_best
    from autoft.searching.preparing import prepare
    from autoft.searching.trials import open_study, run_trials

    def searched(folder, out):
        config = SearchConfig("test_resnet", str(folder), out, trials=1, epochs=2, image_size=16, device="cpu", batch_size=8, cv=2, pruner="none",
                              ensemble=3, seed=0)  # fmt: skip
        session = prepare(config)
        run_trials(session, open_study(session))
        return session, best_trial(session.study)

    few, few_best = searched(image_folder, tmp_path / "few")  # under 100 held-out images: a mix would be chosen by a few of them
    assert len(few.ctx.pool) < 100 and set(member_evidence(few, few_best)[1]) == {few_best.number}
    session, best = searched(colours_120, tmp_path / "run")
    index, evidence = member_evidence(session, best)
    assert len(index) >= 100 and np.array_equal(index, np.arange(len(session.ctx.pool)))  # 2 folds: every labelled image held out once
    assert {c.name for c in session.ctx.candidates} <= set(evidence) and best.number in evidence
    for candidate in session.ctx.candidates:
        assert np.array_equal(evidence[candidate.name], candidate.probabilities[np.searchsorted(candidate.index, index)])

    final = build_final(session, best, {PIXELS: 0.3, best.number: 0.3})  # weights as a reduced ensemble leaves them: summing to 1 again
    assert final.trials == [best.number] and final.simple_members == [PIXELS] and final.members == [best.number, PIXELS] and final.is_ensemble
    assert final.weights == [pytest.approx(0.5), pytest.approx(0.5)]
    best_dir = publish_best(session, final, {})
    assert [m.get("candidate") is not None for m in load_checkpoint(best_dir).meta["ensemble"]] == [False, True]
    assert json.loads((best_dir / "export.json").read_text())["checks"]["fp32"]  # the export verified itself
    pixels = session.ctx.pool.take(range(8)).float().div(255)
    with torch.inference_mode():
        expected = sum(0.5 * load_checkpoint(path).network()(pixels).softmax(1) for path in final.checkpoints).numpy()
    assert np.abs(OnnxClassifier.load(best_dir, device="cpu").probabilities(pixels.numpy()) - expected).max() < 1e-4
    assert json.loads((best_dir / "metrics.json").read_text())["latency_ms"]["model"] > 0  # time to spare: the ensemble's latency is measured
    import dataclasses

    from autoft.core.budget import Budget

    def unmeasured(why: str) -> list[str]:
        metrics = json.loads((publish_best(session, final, {"notes": []}) / "metrics.json").read_text())
        assert "latency_ms" not in metrics
        return [note for note in metrics["notes"] if "latency was not measured" in note and why in note]

    def fails(*args, **kwargs):
        raise ExportFailed("the member's outputs differ")

    monkeypatch.setattr(publishing, "ensemble_latency", fails)  # the member alone fails the export it is timed by: the ensemble still ships, and says so
    assert unmeasured("its first member alone failed its export (the member's outputs differ)")
    session.ctx = dataclasses.replace(session.ctx, budget=Budget.of(0.0))  # the budget spent: exporting a member again to time it would overrun it
    assert unmeasured("left")


def test_an_ensemble_the_time_left_cut_short_is_chosen_again_among_the_members_built(colours_120, tmp_path, monkeypatch):
    """What remains of an ensemble can be worse than one of its members alone (textures at 6m:
    the best trial with logistic regression on pixels read 0.45, the trial alone 0.75): selection
    runs again among the members built, and what ships is at least the best of them."""
    from autoft.searching import finishing
    from autoft.searching.config import SearchConfig
    from autoft.searching.finishing import best_trial, build_final, member_evidence
    from autoft.searching.preparing import prepare
    from autoft.searching.trials import open_study, run_trials

    config = SearchConfig("test_resnet", str(colours_120), tmp_path / "run", trials=2, epochs=2, image_size=16, device="cpu", batch_size=8, cv=2,
                          pruner="none", ensemble=3, seed=0, ranges=["lr=1e-9"])  # fmt: skip  (trials that learn nothing: worse than the pixels)
    session = prepare(config)
    run_trials(session, open_study(session))
    best = best_trial(session.study)
    other = next(t.number for t in session.study.trials if t.number != best.number)
    member = finishing._member
    monkeypatch.setattr(finishing, "_member", lambda s, trial, path, first: (None, {}) if trial.number == other else member(s, trial, path, first))
    final = build_final(session, best, {best.number: 0.4, other: 0.3, PIXELS: 0.3}, choice=finishing.EnsembleChoice({}, 0.0, best.number, 0.0))
    assert other not in final.members and "ensemble reduced to" in final.notes[-1]
    index, evidence = member_evidence(session, best)
    labels = session.ctx.pool.labels.numpy()[index]
    accuracy = lambda p: float((p.argmax(1) == labels).mean())  # noqa: E731
    best_built = max(accuracy(evidence[best.number]), accuracy(evidence[PIXELS]))
    shipped = final.choice.value if final.is_ensemble else accuracy(evidence[final.members[0]])
    assert shipped >= best_built - 1e-9 and sum(final.weights) == pytest.approx(1.0)


def test_time_is_kept_back_for_every_trial_of_the_ensemble_chosen_so_far(colours_120, tmp_path, monkeypatch):
    """Once the trials' evidence chooses an ensemble, the trials stop early enough for each
    further member's whole refit, not only the best trial's; simple members (seconds) and a
    search without ensembles or refits keep nothing back, and the reserve is capped."""
    import dataclasses

    from autoft.searching import finishing
    from autoft.searching.config import SearchConfig
    from autoft.searching.finishing import ENSEMBLE_SHARE, best_trial, ensemble_reserve
    from autoft.searching.preparing import prepare
    from autoft.searching.trials import open_study, run_trials

    config = SearchConfig("test_resnet", str(colours_120), tmp_path / "run", trials=2, epochs=2, image_size=16, device="cpu", batch_size=8, cv=2,
                          pruner="none", ensemble=3, seed=0, timeout="10m")  # fmt: skip
    session = prepare(config)
    run_trials(session, open_study(session))
    best = best_trial(session.study)
    (other,) = [t for t in session.study.get_trials(states=(TrialState.COMPLETE,)) if t.number != best.number]
    chosen = finishing._chosen
    assert session.state.ensemble_seconds == ensemble_reserve(session, best)  # set after each completed trial

    monkeypatch.setattr(finishing, "_chosen", lambda s, b, i, p: ({b.number: 0.5, other.number: 0.3, PIXELS: 0.2}, None))
    whole_refit = 1.2 * (finishing.BUILD_SECONDS + finishing._refit_peak(session, other) * session.seconds_per_step()) + session.ctx.plan.export_seconds
    assert ensemble_reserve(session, best) == pytest.approx(whole_refit)  # its refit and its part of the export; the pixels' member is not counted
    session.state.ensemble_seconds = ensemble_reserve(session, best)
    kept = session.work_budget().reserve("refit", session.refit_reserve()).left() - session.trials_budget().left()
    assert kept == pytest.approx(whole_refit, abs=0.05)

    monkeypatch.setattr(finishing, "_chosen", lambda s, b, i, p: ({b.number: 0.6, PIXELS: 0.4}, None))
    assert ensemble_reserve(session, best) == 0.0  # the best trial's refit is the refit reserve's
    monkeypatch.setattr(finishing, "_chosen", chosen)
    given = session.ctx.config
    configured = lambda **changes: dataclasses.replace(session.ctx, config=dataclasses.replace(given, **changes))  # noqa: E731
    session.ctx = configured(ensemble=1)
    assert ensemble_reserve(session, best) == 0.0
    monkeypatch.setattr(finishing, "_chosen", lambda s, b, i, p: ({b.number: 0.5, other.number: 0.5}, None))
    session.ctx = configured(refit=False)
    assert ensemble_reserve(session, best) == 0.0  # --no-refit: members keep their trial weights
    session.ctx = configured()
    monkeypatch.setattr(session, "seconds_per_step", lambda: 1e4)
    assert ensemble_reserve(session, best) == pytest.approx(ENSEMBLE_SHARE * session.ctx.budget.seconds)


def test_the_time_left_at_the_end_averages_the_shipped_refit_over_other_seeds(colours_120, tmp_path):
    """A single refit trial ships with its recipe trained again from other seeds while the time
    left holds a whole fit, up to SEEDS and ``--ensemble``; the exported model averages them.
    With time for one more, one more; with none, or ``--ensemble 1``, the refit ships alone."""
    from autoft.core.budget import Budget
    from autoft.searching.config import SearchConfig
    from autoft.searching.finishing import REFIT_SPARE, SEEDS, add_seeds, best_trial, build_final
    from autoft.searching.preparing import prepare
    from autoft.searching.publishing import publish_best
    from autoft.searching.trials import open_study, run_trials

    from autoft.core.events import Refit

    refits = []
    config = SearchConfig("test_resnet", str(colours_120), tmp_path / "run", trials=1, epochs=2, image_size=16, device="cpu", batch_size=8, no_cv=True,
                          pruner="none", seed=0, timeout="10m", on_event=lambda e: refits.append(e) if isinstance(e, Refit) else None)  # fmt: skip
    session = prepare(config)
    run_trials(session, open_study(session))
    best = best_trial(session.study)
    single = build_final(session, best, {best.number: 1.0})
    assert single.refit and single.refit["seconds"] > 0 and not single.is_ensemble

    final = add_seeds(session, single)
    assert len(final.checkpoints) == SEEDS and final.trials == [best.number] * SEEDS and final.seeds == SEEDS
    assert final.weights == [pytest.approx(1 / SEEDS)] * SEEDS and final.name == f"trial {best.number} from {SEEDS} seeds"
    assert "from 3 seeds" in final.notes[-1] and len(set(final.checkpoints)) == SEEDS
    assert [(e.number, e.seed) for e in refits] == [(best.number, None), (best.number, 1000), (best.number, 2000)]  # the progress line names each seed
    networks = [load_checkpoint(path).network().eval() for path in final.checkpoints]
    pixels = session.ctx.pool.take(range(8)).float().div(255)
    with torch.inference_mode():
        outputs = [network(pixels).softmax(1) for network in networks]
    assert not torch.allclose(outputs[0], outputs[1])  # another seed, another model
    best_dir = publish_best(session, final, {})
    expected = (sum(outputs) / SEEDS).numpy()
    assert np.abs(OnnxClassifier.load(best_dir, device="cpu").probabilities(pixels.numpy()) - expected).max() < 1e-4

    cost = REFIT_SPARE * (1.0 + single.refit["seconds"]) + session.ctx.plan.export_seconds
    finish = session.ctx.plan.finish_seconds
    session.ctx = dataclasses.replace(session.ctx, budget=Budget.of(finish + cost + 0.2))  # time for one more fit (0.4 s or more), not two
    assert len(add_seeds(session, single).checkpoints) == 2
    session.ctx = dataclasses.replace(session.ctx, budget=Budget.of(finish + 0.5 * cost))
    assert add_seeds(session, single) is single
    session.ctx = dataclasses.replace(session.ctx, budget=Budget.of(3600.0), config=dataclasses.replace(config, ensemble=1))
    assert add_seeds(session, single) is single
