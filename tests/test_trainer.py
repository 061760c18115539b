"""The Trainer: lifecycle, stopping at batch granularity, steps, divergence, safe resuming, errors that name plugins."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import time

import optuna
import pytest
import torch
from typer.testing import CliRunner

from autoft import hookimpl, plugins
from autoft.model.backbones import build_backbone, describe_backbone
from autoft.cli import make_app
from autoft.errors import AutoftError
from autoft.core.events import BatchEnd, EpochEnd, TrainEnd, TrainStart
from autoft.lifecycle import PluginError
from autoft.model.recipe import Recipe, resolve_recipe
from autoft.core.runtime import graceful_interrupts
from autoft.specs import STRATEGY_API, MetricSpec, RegularizerSpec, StrategySpec, TrainPlan
from autoft.testing import registry_with
from autoft.training.trainer import Diverged, Interrupted, OutOfTime, Trainer, TrainerConfig, build_augmentation


@pytest.fixture(scope="module")
def small(digits):
    """256 digits to train on, the usual validation split."""
    return digits.__class__(**{**digits.__dict__, "train": digits.train.subset(range(256))})


def trainer(data, params=None, registry=None, callbacks=(), on_event=None, **config):
    registry = registry or plugins.registry()
    torch.manual_seed(0)
    backbone = build_backbone("test_resnet", num_classes=data.num_classes, registry=registry)
    options = {"epochs": 2, "batch_size": 32, "device": "cpu", **config}
    return Trainer(backbone, data, params or {"strategy": "full"}, TrainerConfig(**options), registry=registry, callbacks=callbacks, on_event=on_event)


class SlowStep:
    """A callback that makes every batch take ``seconds`` longer: a long epoch on a small machine."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def transform_batch(self, ctx, images, targets):
        time.sleep(self.seconds)
        return images, targets


# ---------------------------------------------------------------------------
# Stopping after the current batch


def test_a_deadline_inside_a_long_epoch_stops_after_that_batch_and_keeps_the_best_finished_epoch(small):
    events = []
    run = trainer(small, callbacks=[SlowStep(0.05)], on_event=events.append, epochs=3, batch_size=8)  # 32 batches an epoch
    # the first epoch ends, then the deadline falls a few batches into the second
    first_epoch = []

    def on_event(event):
        events.append(event)
        if isinstance(event, EpochEnd):
            first_epoch.append(event.record)
            run.config.deadline = time.monotonic() + 0.3

    run.on_event = on_event
    result = run.fit()
    stopped_at = time.monotonic()
    assert result.stopped == "deadline" and [r["epoch"] for r in result.history] == [1]
    assert stopped_at - run.config.deadline < 1.0  # not the rest of a 32-batch epoch
    batches_in_second = [e for e in events if isinstance(e, BatchEnd) and e.global_step > 32]
    assert 1 <= len(batches_in_second) < 20
    assert isinstance(events[-1], TrainEnd) and events[-1].stopped == "deadline" and result.best_epoch == 1


class WreckAfterFirstEpoch:
    """Zeroes every weight once the first epoch is evaluated: the second epoch cannot be the best."""

    def on_epoch_end(self, ctx):
        if ctx.epoch == 1:
            with torch.no_grad():
                for parameter in ctx.model.parameters():
                    parameter.zero_()


@pytest.mark.parametrize("keep", ["best", "last"])
def test_a_run_keeps_its_best_or_its_last_weights(small, keep):
    from autoft.model.metrics import evaluate, metric_specs

    run = trainer(small, callbacks=[WreckAfterFirstEpoch()], epochs=2, batch_size=8, keep=keep)
    result = run.fit()
    first, last = (r["val_accuracy"] for r in result.history)
    assert first > last + 0.1  # the wreck worked
    kept = evaluate(run.net, small.val, torch.device("cpu"), 64, metric_specs("accuracy", plugins.registry()), plugins.registry())["accuracy"]
    expected = first if keep == "best" else last
    assert result.best_epoch == (1 if keep == "best" else 2) and result.val["accuracy"] == expected and kept == pytest.approx(expected)


def test_a_deadline_before_the_first_epoch_ends_leaves_nothing_to_keep(small):
    run = trainer(small, callbacks=[SlowStep(0.05)], batch_size=8, deadline=time.monotonic() + 0.2)
    started = time.monotonic()
    with pytest.raises(OutOfTime):
        run.fit()
    assert time.monotonic() - started < 2.0  # an epoch here is 32 batches of at least 50 ms


def test_stop_ends_after_the_current_batch(small):
    steps = []
    run = trainer(small, epochs=3, batch_size=8)

    def on_event(event):
        if isinstance(event, BatchEnd):
            steps.append(event.global_step)
            if event.global_step == 40:  # the 8th batch of the second epoch
                run.stop()

    run.on_event = on_event
    result = run.fit()
    assert steps[-1] == 40 and result.stopped == "interrupted" and len(result.history) == 1
    with pytest.raises(Interrupted):  # nothing finished: nothing to keep
        early = trainer(small, batch_size=8)
        early.on_event = lambda event: early.stop()
        early.fit()


def test_ctrl_c_is_acknowledged_at_once_and_stops_after_the_batch(small):
    acknowledged = []
    run = trainer(small, epochs=3, batch_size=8)

    def on_event(event):
        if isinstance(event, BatchEnd) and event.global_step == 36:
            os.kill(os.getpid(), signal.SIGINT)
            acknowledged.append(event.global_step)  # the handler ran before this line

    run.on_event = on_event
    with graceful_interrupts(lambda: acknowledged.append("stopping after this batch")):
        result = run.fit()
    assert acknowledged == ["stopping after this batch", 36]
    assert result.stopped == "interrupted" and [r["epoch"] for r in result.history] == [1]


def test_a_second_ctrl_c_aborts():
    def interrupt_twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), graceful_interrupts():
        interrupt_twice()


# ---------------------------------------------------------------------------
# Training planned in steps


def test_steps_and_an_evaluation_interval_repeat_a_tiny_training_set(small):
    tiny = small.__class__(**{**small.__dict__, "train": small.train.subset(range(16))})
    starts, records = [], []

    def on_event(event):
        if isinstance(event, TrainStart):
            starts.append(event)
        if isinstance(event, EpochEnd):
            records.append(event.record)

    result = trainer(tiny, on_event=on_event, steps=20, eval_every=6, batch_size=8).fit()  # 2 batches a pass: 10 passes
    assert starts[0].epochs == 4 and starts[0].steps == 20 and starts[0].steps_per_epoch == 6
    assert [r["step"] for r in records] == [6, 12, 18, 20]  # the last period is what is left
    assert len(result.history) == 4


def test_epochs_remain_the_default_unit(small):
    result = trainer(small, epochs=2, batch_size=64).fit()
    assert [r["step"] for r in result.history] == [4, 8]


# ---------------------------------------------------------------------------
# A training set on disk


def test_a_set_on_disk_trains_a_batch_at_a_time_exactly_as_in_memory(small, monkeypatch):
    from autoft.data import cache
    from autoft.data.decoding import load_data

    def part(data):
        return data.__class__(**{**data.__dict__, "train": data.train.subset(range(128)), "val": data.val.subset(range(64))})

    monkeypatch.setenv("AUTOFT_MAX_IN_MEMORY", "0")
    in_memory, on_disk = part(small), part(load_data("sample:digits", image_size=32, seed=0))  # the pixels and split of ``digits``, left on disk
    assert on_disk.train.on_disk and on_disk.val.on_disk and not in_memory.train.on_disk
    reads = []
    read = cache.ImageStore.read
    monkeypatch.setattr(cache.ImageStore, "read", lambda store, rows: reads.append(len(rows)) or read(store, rows))
    runs = []
    for data in (in_memory, on_disk):
        run = trainer(data, epochs=2, batch_size=24)  # 5 batches of 24 and one of 8 a pass
        runs.append((run.fit(), run.backbone.model.state_dict()))
    (memory, memory_weights), (disk, disk_weights) = runs
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in disk.history] == [{k: v for k, v in r.items() if k != "seconds"} for r in memory.history]
    assert all(torch.equal(memory_weights[k], disk_weights[k]) for k in memory_weights)
    # Each epoch read every training image and every validation image once, a batch at a time.
    assert sum(reads) == 2 * (128 + 64) and max(reads) == 48


# ---------------------------------------------------------------------------
# Divergence


def test_a_loss_that_explodes_without_nan_is_diverged_not_completed(small):
    with pytest.raises(Diverged, match="chance level"):
        trainer(small, {"strategy": "full", "lr": 10.0}, epochs=3, batch_size=64).fit()


def test_a_spike_that_ends_at_chance_accuracy_is_diverged(small):
    # lr=0.5: the loss rises to 2.5x chance (5.8), falls back to chance (2.3), and the model guesses.
    with pytest.raises(Diverged, match="is chance level"):
        trainer(small, {"strategy": "full", "lr": 0.5}, epochs=3, batch_size=64).fit()


def test_a_good_run_is_not_diverged(small):
    result = trainer(small, {"strategy": "full", "lr": 3e-3}, epochs=3, batch_size=32).fit()
    assert result.history[-1]["val_accuracy"] > 0.3  # chance is 0.1


# ---------------------------------------------------------------------------
# The resumable state: written on an interval, never unpickled


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file when unpickled


def test_a_planted_pickle_in_the_state_file_is_refused_and_runs_nothing(small, tmp_path):
    marker = tmp_path / "pwned"
    state = tmp_path / "state.pt"
    torch.save({"format": 2, "model": _Payload(marker)}, state)
    (tmp_path / "state.pt.sha256").write_text(hashlib.sha256(state.read_bytes()).hexdigest())  # its checksum planted too
    assert pickle.loads(pickle.dumps(_Payload(tmp_path / "check"))) and (tmp_path / "check").exists()  # the payload is live
    with pytest.raises(AutoftError, match=r"cannot read training state .*state\.pt: it holds code, not only tensors and plain data \(Unsupported global: .*open.*\); refused unread"):
        trainer(small, state_file=state, epochs=1).fit()
    assert not marker.exists()


def test_the_state_is_written_on_a_time_interval(small, tmp_path):
    every_epoch, rarely = tmp_path / "every.pt", tmp_path / "rarely.pt"
    trainer(small, state_file=every_epoch, state_interval=0, epochs=1, batch_size=64).fit()
    trainer(small, state_file=rarely, state_interval=3600, epochs=2, batch_size=64).fit()
    assert every_epoch.is_file() and not rarely.exists()


def test_an_older_state_layout_starts_over(small, tmp_path):
    state = tmp_path / "state.pt"
    torch.save({"model": {}, "history": []}, state)  # autoft's first layout had no format
    result = trainer(small, state_file=state, epochs=1, batch_size=64).fit()
    assert [r["epoch"] for r in result.history] == [1]


# ---------------------------------------------------------------------------
# Plugins at the boundary


class Faulty:
    """Plugins with the mistakes the boundary must name."""

    @hookimpl
    def autoft_register_strategies(self, register):
        class BadDefault:
            def default_params(self, n_groups):
                return {"bad_depth": 99}

            def suggest(self, trial, n_groups):
                return {"bad_depth": trial.suggest_int("bad_depth", 0, n_groups - 1)}

            def apply(self, backbone, params):
                return TrainPlan([{"params": list(backbone.model.parameters())}])

        class NanLater(BadDefault):
            def default_params(self, n_groups):
                return {}

            def suggest(self, trial, n_groups):
                return {}

            def loss_term(self, ctx, logits, targets, features):
                return logits.sum() * (float("nan") if ctx.step == 3 else 0.0)

        class Legacy(NanLater):
            def apply(self, backbone, params):
                weights = list(backbone.model.parameters())
                return TrainPlan([{"params": weights}], extra_loss=lambda: 1e-3 * sum(w.pow(2).sum() for w in weights))

        register(StrategySpec("bad-default", "", BadDefault, api_version=STRATEGY_API))
        register(StrategySpec("nan-later", "", NanLater, api_version=STRATEGY_API))
        register(StrategySpec("legacy", "", Legacy, api_version=1))
        register(StrategySpec("legacy-as-v2", "", Legacy, api_version=STRATEGY_API))

    @hookimpl
    def autoft_register_regularizers(self, register):
        class OneTensor:
            def default_params(self):
                return {}

            def suggest(self, trial):
                return {}

            def transform_batch(self, ctx, images, targets):
                return images  # forgot the targets

        register(RegularizerSpec("one-tensor", "", OneTensor))

    @hookimpl
    def autoft_register_metrics(self, register):
        register(MetricSpec("error_rate", "1 - accuracy", lambda labels, p: float((p.argmax(1) != labels).mean()), greater_is_better=False))


@pytest.fixture(scope="module")
def faulty():
    return registry_with(Faulty())


def test_a_plugins_default_outside_its_own_range_names_the_plugin(faulty):
    with pytest.raises(PluginError, match=r"^strategy 'bad-default' \(Faulty\): its default bad_depth=99 is outside its own range \[0, 5\]$"):
        resolve_recipe({"strategy": "bad-default"}, 6, faulty)


def test_a_users_value_outside_a_range_is_a_user_error(faulty):
    with pytest.raises(AutoftError, match=r"dropout=1.0 is outside \[0.0, 1.0\)") as caught:
        resolve_recipe({"dropout": 1.0}, 6, faulty)
    assert not isinstance(caught.value, PluginError)
    with pytest.raises(AutoftError, match="augment='sharpen' is not one of crop-flip, shift, randaugment, trivialaugment, none"):
        Recipe.from_params({"augment": "sharpen"})


def test_a_nan_from_a_loss_term_blames_the_strategy_not_the_learning_rate(small, faulty):
    with pytest.raises(PluginError, match=r"strategy 'nan-later' \(Faulty\): loss_term\(\) returned nan at step 3"):
        trainer(small, {"strategy": "nan-later"}, faulty, epochs=1, batch_size=64).fit()


def test_a_transform_returning_the_wrong_type_is_one_line_naming_the_regularizer(small, faulty):
    with pytest.raises(PluginError) as caught:
        trainer(small, {"strategy": "full", "regularizer": "one-tensor"}, faulty, epochs=1, batch_size=64).fit()
    message = str(caught.value)
    assert message.startswith("regularizer 'one-tensor' (Faulty): transform_batch() returned a (64, 3, 32, 32) float32 tensor; expected (images (64, 3, 32, 32), targets (64, 10))")
    assert "\n" not in message


def test_an_api_1_strategy_keeps_working_with_a_deprecation_note(small, faulty):
    with pytest.warns(DeprecationWarning, match=r"strategy 'legacy' \(Faulty\) is written for autoft's strategy API 1 .*loss_term"):
        result = trainer(small, {"strategy": "legacy"}, faulty, epochs=1, batch_size=64).fit()
    plain = trainer(small, {"strategy": "full"}, faulty, epochs=1, batch_size=64).fit()
    assert result.history[0]["train_loss"] > plain.history[0]["train_loss"]  # its penalty was added
    with pytest.raises(PluginError, match="replaces by loss_term"):
        trainer(small, {"strategy": "legacy-as-v2"}, faulty, epochs=1, batch_size=64).fit()


def test_a_metric_to_minimise_selects_the_lowest_epoch(small, faulty):
    result = trainer(small, {"strategy": "full", "lr": 3e-3}, faulty, metric="error_rate", epochs=3, batch_size=64).fit()
    errors = [r["val_error_rate"] for r in result.history]
    assert result.best_epoch == 1 + errors.index(min(errors))
    assert result.val["error_rate"] == min(errors)


def test_labels_outside_the_classes_are_a_clear_error(small):
    broken = small.__class__(**{**small.__dict__, "classes": small.classes[:5]})
    with pytest.raises(AutoftError, match=r"labels must index the 5 classes, found labels from 0 to 9"):
        trainer(broken, epochs=1).fit()


# ---------------------------------------------------------------------------
# Built-in strategies, regularisers and the recipe


def test_lp_ft_trains_the_head_first_then_the_body(small):
    seen = {}

    class Watch:
        def on_epoch_start(self, ctx):
            seen[ctx.epoch] = sorted({g.name for g in ctx.backbone.groups for p in ctx.group_parameters([g.name]) if p.requires_grad})

    recipe = resolve_recipe({"strategy": "lp-ft", "lpft_probe_share": 0.5}, 6, plugins.registry())
    trainer(small, recipe, callbacks=[Watch()], epochs=4, batch_size=64).fit()
    assert seen[1] == seen[2] == ["head"] and len(seen[3]) == 6 == len(seen[4])


def _group_of(backbone) -> dict[int, int]:
    by_name = dict(backbone.model.named_parameters())
    return {id(by_name[name]): i for i, group in enumerate(backbone.groups) for name in group.params}


@pytest.mark.parametrize(
    "params, body_scale",
    [
        ({"strategy": "full"}, 1.0),
        ({"strategy": "freeze", "freeze_depth": 2}, 1.0),
        ({"strategy": "l2sp", "freeze_depth": 1, "l2sp_alpha": 0.01}, 1.0),
        ({"strategy": "lp-ft", "lpft_probe_share": 0.5, "lpft_body_lr_scale": 0.3, "freeze_depth": 0}, 0.3),  # the body joins after the probe
        ({"strategy": "discriminative"}, 1.0),
    ],
)
def test_layer_wise_lr_decay_gives_group_i_of_n_lr_times_decay_to_the_n_1_i_for_every_strategy(small, params, body_scale):
    recipe = resolve_recipe({**params, "lr_decay": 0.5}, 6, plugins.registry())
    run = trainer(small, recipe, epochs=2, batch_size=64)
    run.fit()
    group_of, n = _group_of(run.backbone), len(run.backbone.groups)
    trained = set()
    for group in run.ctx.optimizer.param_groups:
        (i,) = {group_of[id(p)] for p in group["params"]}  # one backbone group per optimizer group
        scale = 1.0 if i == n - 1 else body_scale
        assert group["lr_scale"] == pytest.approx(scale * 0.5 ** (n - 1 - i)), (i, group["lr_scale"])
        trained.add(i)
    first = {"freeze": 2, "l2sp": 1}.get(params["strategy"], 0)
    assert trained == set(range(first, n))  # every group the strategy trains, each at its own rate


def test_without_lr_decay_a_strategys_groups_stay_as_it_made_them(small):
    run = trainer(small, {"strategy": "full"}, epochs=1, batch_size=64)
    run.fit()
    assert len(run.ctx.optimizer.param_groups) == 1 and run.ctx.optimizer.param_groups[0]["lr_scale"] == 1.0


@pytest.mark.parametrize("bn", ["keep", "adapt"])
def test_bn_keep_holds_the_running_statistics_while_the_affine_parameters_train(small, bn):
    run = trainer(small, {"strategy": "full", "bn": bn}, epochs=1, batch_size=64)
    norms = [m for m in run.backbone.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.weight.detach().clone()) for m in norms]
    run.fit()
    assert norms and all(not torch.equal(m.weight, weight) for m, (_, weight) in zip(norms, before))  # affine parameters trained either way
    kept = [torch.equal(m.running_mean, mean) for m, (mean, _) in zip(norms, before)]
    assert all(kept) if bn == "keep" else not any(kept)


def test_lr_decay_and_bn_are_checked_like_the_base_parameters():
    with pytest.raises(AutoftError, match=r"lr_decay=1\.5 is outside \(0\.0, 1\.0\]"):
        Recipe.from_params({"lr_decay": 1.5})
    with pytest.raises(AutoftError, match="bn='forget' is not one of adapt, keep"):
        Recipe.from_params({"bn": "forget"})
    assert Recipe.from_params({"lr_decay": "0.75", "bn": "keep"}).extra == {"lr_decay": 0.75, "bn": "keep"}


def test_a_group_a_callback_adds_to_the_optimizer_itself_trains(small):
    class AddsItsOwnGroup:
        def on_epoch_start(self, ctx):
            if ctx.epoch == 2:
                body = ctx.group_parameters([g.name for g in ctx.backbone.groups[:-1]])
                for p in body:
                    p.requires_grad_(True)
                ctx.optimizer.add_param_group({"params": body, "lr": 1e-4, "weight_decay": 0.0})
                self.stem = body[0].detach().clone()

        def on_epoch_end(self, ctx):
            self.trained = ctx.epoch == 3 and not torch.equal(self.stem, ctx.group_parameters(["stem"])[0])

    callback = AddsItsOwnGroup()
    run = trainer(small, {"strategy": "linear-probe"}, callbacks=[callback], epochs=3, batch_size=64)
    run.fit()
    assert len(run.ctx.optimizer.param_groups) == 2 and run.ctx.optimizer.param_groups[1]["lr_scale"] == pytest.approx(0.1)
    assert callback.trained


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixing_regularisers_blend_targets_as_they_blend_images(name):
    registry = plugins.registry()
    regularizer = registry.regularizer(name).factory()

    class Ctx:
        params = regularizer.default_params()

    torch.manual_seed(0)
    images = torch.zeros(8, 3, 16, 16)
    images[4:] = 1.0  # the second half white: a pixel's mean is the white share
    targets = torch.nn.functional.one_hot(torch.tensor([0] * 4 + [1] * 4), 2).float()
    mixed, soft = regularizer.transform_batch(Ctx(), images, targets)
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), soft[:, 1], atol=1e-5)  # the label follows the pixels
    assert (soft > 0).all(dim=1).any()  # some pair was actually mixed


def test_bss_penalises_the_smallest_singular_values():
    bss = plugins.registry().regularizer("bss").factory()

    class Ctx:
        params = {"bss_weight": 1.0}

    features = torch.diag(torch.tensor([5.0, 4.0, 3.0, 0.5]))
    assert bss.loss_term(Ctx(), None, None, features).item() == pytest.approx(0.25)


@pytest.mark.parametrize("policy", ["crop-flip", "shift", "randaugment", "trivialaugment", "none"])
def test_augmentation_policies(policy):
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    augment = build_augmentation(Recipe(augment=policy, augment_magnitude=12), 24, hflip=True)
    torch.manual_seed(0)
    out = augment(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, images) == (policy == "none")


def test_shift_moves_a_small_object_whole_and_unscaled():
    images = torch.zeros(16, 3, 24, 24)
    images[:, :, 9:15, 9:15] = 1.0  # a 6-px square in the middle: any shift of up to 3 px keeps all of it
    torch.manual_seed(0)
    out = build_augmentation(Recipe(augment="shift"), 24, hflip=False)(images)
    assert out.shape == images.shape
    assert torch.equal(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))  # nothing cut off, nothing resampled
    assert set(out.unique().tolist()) == {0.0, 1.0}
    corners = {tuple(torch.nonzero(image[0])[0].tolist()) for image in out}
    assert len(corners) > 1 and all(6 <= row <= 12 and 6 <= col <= 12 for row, col in corners)  # moved, by at most 3 px


def test_describing_a_backbone_needs_no_build(monkeypatch):
    from autoft_plugins import timm_backbones

    built = build_backbone("test_vit", num_classes=2)
    monkeypatch.setattr(timm_backbones, "create", lambda *a, **k: pytest.fail("describe() built the model"))
    info = describe_backbone("test_vit")
    assert (info.input_size, info.mean, info.std, info.num_groups) == (built.input_size, built.mean, built.std, len(built.groups))
    probe = build_backbone("torchvision:resnet18", num_classes=2)  # no describe(): one throwaway build
    assert describe_backbone("torchvision:resnet18").num_groups == len(probe.groups)


def test_the_search_space_offers_lp_ft_and_the_regularisers_and_the_report_ranks_them(tmp_path):
    from autoft.searching.report import write_report
    from autoft.searching import SearchSpace

    registry = plugins.registry()
    strategies = {name: registry.strategy(name).factory() for name in ("freeze", "l2sp", "lp-ft")}
    space = SearchSpace(tuple(strategies))
    described = space.describe(6, strategies)
    assert described["regularizer"] == "none, mixup, cutmix, bss" and "lp-ft" in described["strategy"]
    assert {"mixup_alpha", "cutmix_alpha", "bss_weight", "lpft_probe_share", "label_smoothing", "augment"} <= set(described)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        params = space.suggest(trial, strategies, 6)
        study.tell(trial, 0.5 + 0.3 * (params["regularizer"] == "mixup") + 0.1 * (params["strategy"] == "lp-ft"))
    page = write_report(study, tmp_path / "report.html", info={"metric": "accuracy", "space": described}, classes=["a", "b"]).read_text()
    importances = page[page.index("<h2>Parameter importances</h2>") :].split("<h2>")[1]
    assert ">regularizer<" in importances and ">strategy<" in importances


def test_train_cli_validates_the_recipe_from_its_table(tmp_path):
    result = CliRunner().invoke(make_app(), ["train", "--backbone", "test_resnet", "--data", "sample:digits", "--out", str(tmp_path), "--dropout", "1.0"])
    assert result.exit_code == 2 and "dropout=1.0 is outside [0.0, 1.0)" in result.output and "Traceback" not in result.output
    help_text = CliRunner().invoke(make_app(), ["train", "--help"]).output
    assert "Label smoothing" in help_text and "--metric" in help_text and "--regularizer" in help_text


def test_train_with_a_regulariser_and_metric_records_them(digits, tmp_path):
    import autoft

    result = autoft.train(
        "test_resnet", digits, tmp_path, epochs=1, batch_size=128, metric="balanced_accuracy", device="cpu",
        extra_params={"regularizer": "cutmix", "label_smoothing": 0.0, "augment": "trivialaugment"},
    )  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metric"] == "balanced_accuracy" and "val_balanced_accuracy" in metrics and "test_balanced_accuracy" not in metrics
    assert result.params["regularizer"] == "cutmix" and result.params["cutmix_alpha"] == 1.0 and result.params["augment"] == "trivialaugment"


# ---------------------------------------------------------------------------
# FixMatch on unlabelled images


def test_the_pseudo_label_loss_only_uses_confident_images():
    from autoft_plugins.regularizers import pseudo_label_loss

    weak = torch.tensor([[0.97, 0.02, 0.01], [0.40, 0.35, 0.25], [0.01, 0.96, 0.03]])  # the middle one is unsure
    strong = torch.randn(3, 3, requires_grad=True)
    pseudo_label_loss(strong, weak, threshold=0.95).backward()
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0 and strong.grad[2].abs().sum() > 0
    assert strong.grad[0].argmin() == 0 and strong.grad[2].argmin() == 1  # pulled towards the pseudo-labels
    assert pseudo_label_loss(strong, weak, threshold=0.99).item() == 0.0  # nothing confident: no loss


def test_fixmatch_trains_on_unlabelled_images_handed_to_the_trainer(small, digits):
    recipe = resolve_recipe({"strategy": "full", "lr": 3e-3, "regularizer": "fixmatch", "fixmatch_threshold": 0.7}, 6, plugins.registry())
    run = trainer(small, recipe, epochs=3, batch_size=32)
    run.unlabelled = digits.val.images[:64]
    result = run.fit()
    added = [r["train_loss"] - r["train_cross_entropy"] for r in result.history]
    assert added[0] >= 0 and added[-1] > 0  # once the model is confident on some unlabelled images, they add a loss
    with pytest.raises(AutoftError, match="unlabelled images must be uint8 \\(3, 32, 32\\)"):
        mismatched = trainer(small, recipe, epochs=1)
        mismatched.unlabelled = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
        mismatched.fit()
