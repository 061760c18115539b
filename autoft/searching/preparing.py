"""Before the first trial: weights, calibration, the plan, decoding, the study, pretraining, baselines."""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from autoft import plugins
from autoft.model.backbones import build_backbone, describe_backbone
from autoft.core.budget import Budget
from autoft.data import DataSplits, ImageTensors, image_files
from autoft.data.decoding import decode_and_split
from autoft.errors import AutoftError
from autoft.core.events import PlanMade, WeightsNotice
from autoft.model.metrics import metric_specs, score as metric_score
from autoft.searching.planning import BudgetTooSmall, DataShape, Overrides, Plan, SizeProbe, affordable_sizes, calibrate, candidate_sizes, fit_batch_size, make_plan, median_short_side
from autoft.searching.sizing import PROBE_SHARE, measure_sizes
from autoft.core.text import duration
from autoft.core.runtime import resolve_device, resolve_jobs, seed_everything, threads_per_job, torch_threads
from autoft.searching.config import SearchConfig, default_study_name
from autoft.searching.pretraining_stage import StageResult, pretraining_stage
from autoft.searching.session import PSEUDO_DEFAULT, SearchContext, SearchState, Session, _Timer, make_splits
from autoft.training.semisupervised import pseudo_labels
from autoft.searching.space import DEFAULT_REGULARIZERS, DEFAULT_STRATEGIES, SearchSpace, load_overrides
from autoft.searching.storage import default_storage_url, open_storage
from autoft.model.weights import resolve_weights

VAL_FRACTION = 0.2
CALIBRATION_SHARE = 0.1  # of the budget left: the most measuring the device may take


@dataclass
class _Setup:
    """What is known before any image is decoded: the checked options and the plugins they name."""

    config: SearchConfig
    registry: plugins.Registry
    strategies: dict[str, Any]
    space: SearchSpace
    n_groups: int
    input_size: int
    device: torch.device
    jobs: int
    weights: str | None
    budget: Budget
    modules: int  # the model's, which its export's cost grows with


def prepare(config: SearchConfig, registry: plugins.Registry | None = None) -> Session:
    """Everything before the first trial, in the order the budget needs it: check the options,
    choose the starting weights, measure the device, plan, decode, check flips, pretrain, fit
    the reference models. Returns the search with its context complete and frozen."""
    setup = _setup(config, registry or plugins.registry(), Budget.of(config.seconds, start=config.started))
    timings: dict[str, float] = {}
    labelled_images, data_source = _labelled_source(config.data, setup.registry)
    plan, data, unlabelled, skipped = _plan_and_decode(setup, labelled_images, timings)
    with torch_threads(plan.threads):  # the rest of the preparation trains and embeds with the CPU threads measured fastest
        pool = ImageTensors.concat([data.train, data.val])
        splits = make_splits(pool.labels.numpy(), len(data.train), plan.folds, plan.repeats, config.seed)
        if data.hflip:
            plan = _check_flips(pool, splits[0], plan, config.seed)
            data.hflip = plan.flips
        out, study_name, storage_url = _where(config, data_source or data, setup.jobs)
        study = _create_study(study_name, storage_url, setup.registry, config.metric)
        state = SearchState(study=study, timings=timings, on_event=config.on_event)
        _emit(config, PlanMade(plan.line(), plan.as_dict()))
        space, features = setup.space, {}
        if unlabelled is not None:
            with _Timer(timings, "pretraining"):
                stage = pretraining_stage(config, plan, pool, unlabelled, data, weights=setup.weights, device=setup.device, budget=setup.budget,
                                          out=out, skipped=skipped, emit=lambda event: _emit(config, event))  # fmt: skip
            space = _semi_supervised_space(space, stage, plan.pseudo_labels)
            if stage is not None and stage.note:
                state.notes.append(stage.note)
            if stage is not None and stage.features:
                features["pretrained"] = stage.features
                state.embedders["pretrained"] = features_of(config.backbone, data.num_classes, stage.features, setup.registry, setup.device, config.seed)
        with _Timer(timings, "baselines"):
            candidates = _candidates(setup, plan, pool, splits, data, unlabelled, state)
        if "start" in state.embedders:
            features = {"start": setup.weights, **features}
            state.embedders = {"start": state.embedders["start"], **state.embedders}
        ctx = SearchContext(
            config=config, registry=setup.registry, device=setup.device, data=data, pool=pool, splits=tuple(splits), plan=plan, space=space,
            strategies=setup.strategies, n_groups=setup.n_groups, weights=setup.weights, out=out, study_name=study_name, storage_url=storage_url,
            budget=setup.budget, data_source=data_source, unlabelled=unlabelled, unlabelled_skipped=tuple(skipped), candidates=tuple(candidates),
            embedder_weights=features, jobs=setup.jobs,
        )  # fmt: skip
    return Session(ctx, state)


def prepare_worker(ctx: SearchContext, index: int, device: str, registry: plugins.Registry) -> Session:
    """A ``--jobs`` worker's search: the command's context as it is, with the images read
    again (from the decode cache) and this process's device, registry and study handle."""
    config = ctx.config
    labelled_images, _ = _labelled_source(config.data, registry)
    data, unlabelled, _ = _decode(config, labelled_images, ctx.plan.image_size, registry)
    data.hflip = ctx.plan.flips
    pool = ImageTensors.concat([data.train, data.val])
    strategies = {name: registry.strategy(name).factory() for name in ctx.strategies}
    space = dataclasses.replace(ctx.space, registry=registry)
    ctx = dataclasses.replace(ctx, registry=registry, space=space, strategies=strategies, device=resolve_device(device), data=data, pool=pool, unlabelled=unlabelled, worker=index, jobs=1)
    state = SearchState(study=_create_study(ctx.study_name, ctx.storage_url, registry, config.metric))
    for name, weights in ctx.embedder_weights.items():
        state.embedders[name] = features_of(config.backbone, data.num_classes, weights, registry, ctx.device, config.seed)
    return Session(ctx, state)


def _setup(config: SearchConfig, registry: plugins.Registry, budget: Budget, worker: bool = False) -> _Setup:
    """Check every option and plugin name; choose the starting weights. Nothing decoded yet."""
    config.check()
    chosen = config.strategies or registry.without_clashes("strategies", DEFAULT_STRATEGIES)  # a clash breaks only a name asked for
    strategies = {name: registry.strategy(name).factory() for name in dict.fromkeys(chosen)}
    metric_specs(config.metric, registry)  # an unknown metric fails here
    if config.unlabelled is not None:
        registry.pretrainer(config.pretrain)
    info = describe_backbone(config.backbone, registry)
    regularizers = registry.without_clashes("regularizers", DEFAULT_REGULARIZERS)
    weights, notice = resolve_weights(config.weights, config.backbone, registry)
    space = config.space or SearchSpace(tuple(strategies), load_overrides(config.ranges, config.space_file), regularizers=regularizers)
    space = dataclasses.replace(space, pretrained=weights is not None, registry=registry)
    space.check_names(info.num_groups, strategies)
    device = resolve_device(config.device)
    jobs = 1 if worker else resolve_jobs(config.jobs, device)
    if notice:
        _emit(config, WeightsNotice(notice))
    model = build_backbone(config.backbone, num_classes=2, weights=weights, registry=registry).model  # a bad weights file fails before decoding
    return _Setup(config, registry, strategies, space, info.num_groups, info.input_size, device, jobs, weights, budget, sum(1 for _ in model.modules()))


def _plan_and_decode(setup: _Setup, labelled_images: Any, timings: dict[str, float]):
    """Calibrate, plan, decode at the planned size, and plan again with what decoding left."""
    config = setup.config
    shape, classes = _data_shape(labelled_images, _count_unlabelled(config.unlabelled))
    clock = time.monotonic()
    pretrained = setup.weights is not None
    side = _median_side(labelled_images)
    shape = _before_decoding(shape, labelled_images, side)
    sizes = [config.image_size] if config.image_size else candidate_sizes(side, setup.input_size, pretrained)
    make_model = lambda: build_backbone(config.backbone, num_classes=max(2, classes), registry=setup.registry).model
    left = setup.budget.left()
    # Timed at the batch the fits will train with: a step's fixed costs weigh more in a small one (resnet18 at
    # 32 px on 2 cores: 100 ms a step of 16, 171 of 64), and 16 priced from a rate at 32 was 1.6 times too cheap.
    rates = calibrate(make_model, sizes, fit_batch_size(shape, config.batch_size), setup.device, max(2, classes), limit=None if left is None else CALIBRATION_SHARE * left,
                      threads=threads_per_job(setup.jobs))  # at most what one of the --jobs workers will have  # fmt: skip
    timings["calibration"] = time.monotonic() - clock
    overrides = Overrides(image_size=config.image_size, epochs=config.epochs, trials=config.trials, pretrain_epochs=config.pretrain_epochs,
                          cv=config.cv, no_cv=config.no_cv, batch_size=config.batch_size)  # fmt: skip
    with torch_threads(next(iter(rates.values())).threads):
        probe = _size_probe(setup, shape, rates, overrides, labelled_images) if pretrained and not config.image_size else None
    if probe is not None:
        timings["size probe"] = probe.seconds
    plan = _plan(setup, shape, rates, overrides, pretrained, probe)
    clock = time.monotonic()
    data, unlabelled, skipped = _decode(config, labelled_images, plan.image_size, setup.registry)
    timings["decoding"] = time.monotonic() - clock
    decoded = dataclasses.replace(overrides, image_size=data.image_size)  # what decoding left, at the size decoded
    plan = _plan(setup, _data_shape(data, 0 if unlabelled is None else len(unlabelled))[0], rates, decoded, pretrained, probe)
    return plan, data, unlabelled, skipped


def _size_probe(setup: _Setup, shape: DataShape, rates, overrides: Overrides, labelled: Any) -> SizeProbe | None:
    """From pretrained weights, when the budget affords more than one size: a linear probe's
    accuracy at each (:mod:`autoft.searching.sizing`), within :data:`PROBE_SHARE` of the time left."""
    from autoft.training.candidates import Probe

    if isinstance(labelled, DataSplits):
        return None  # decoded already, at their own size: there is no other to choose
    left, config = setup.budget.left(), setup.config
    sizes = affordable_sizes(shape, rates, left, overrides, pretrained=True, jobs=setup.jobs, modules=setup.modules)
    if len(sizes) < 2:
        return None
    embed = lambda: Probe.build(config.backbone, setup.weights, max(2, shape.classes), registry=setup.registry, device=setup.device, seed=config.seed).embed
    return measure_sizes(labelled, sizes, rates, embed, limit=None if left is None else PROBE_SHARE * left, source_side=shape.source_side, seed=config.seed)


def _decode(config: SearchConfig, labelled_images: Any, image_size: int, registry: plugins.Registry):
    data = labelled_images if isinstance(labelled_images, DataSplits) else decode_and_split(labelled_images, image_size=image_size, val_fraction=VAL_FRACTION, seed=config.seed)
    unlabelled, skipped = _decode_unlabelled(config.unlabelled, data.image_size, registry)
    return data, unlabelled, skipped


def _where(config: SearchConfig, source: Any, jobs: int) -> tuple[Path, str, str]:
    """(the search's folder, the study's name, its storage URL)."""
    study_name = config.study or default_study_name(config.backbone, source)
    out = Path(config.out).expanduser() if config.out is not None else Path("runs") / study_name
    _check_out(out)
    return out, study_name, config.storage or default_storage_url(out, jobs)


def _create_study(name: str, storage_url: str, registry: plugins.Registry, metric: str) -> optuna.Study:
    direction = "maximize" if registry.metric(metric).greater_is_better else "minimize"
    return optuna.create_study(study_name=name, storage=open_storage(storage_url), direction=direction, sampler=optuna.samplers.RandomSampler(), load_if_exists=True)


def _semi_supervised_space(space: SearchSpace, stage: StageResult | None, pseudo_labels: bool) -> SearchSpace:
    """With unlabelled images the search also chooses, when the plan bought them, pseudo-labels
    and FixMatch, and, after a pretraining stage, which of its checkpoints to start from."""
    choices = dict(space.choices)
    if pseudo_labels:
        choices["pseudo_labels"] = ["propagate", "none"]
    if stage is not None and len(stage.init) > 1:
        choices["init"] = list(stage.init)
    regularizers = space.regularizers
    if pseudo_labels and "fixmatch" not in regularizers and not space.overrides.get("regularizer"):
        regularizers = (*regularizers, "fixmatch")
    return dataclasses.replace(space, choices=choices, regularizers=regularizers, regularizer_objects={})


def _candidates(setup: _Setup, plan: Plan, pool: ImageTensors, splits: list, data: DataSplits, unlabelled: torch.Tensor | None, state: SearchState) -> list:
    """The simple models, fitted and scored on exactly the trials' splits: logistic regression on
    pixels, the linear probe on the starting weights' features (when the plan bought it, priced
    by the measured evaluation rate: those features then also label the unlabelled images), and, with unlabelled
    images, label spreading distilled into a model. Each can ship if it wins."""
    from autoft.training.candidates import Probe, fit_candidates

    config, registry = setup.config, setup.registry
    spec = registry.metric(config.metric)
    score = lambda labels, probabilities: metric_score(spec, labels, probabilities, registry)
    probe = None
    if plan.probe:  # bought by the plan, priced at the measured evaluation rate
        probe = Probe.build(config.backbone, setup.weights, data.num_classes, registry=registry, device=setup.device, seed=config.seed)
        if setup.weights is not None:
            state.embedders["start"] = probe.embed
    pseudo = None
    if unlabelled is not None:
        pseudo = lambda split, train: pseudo_labels(state.pseudo, pool, unlabelled, data.num_classes, state.embedders, config.seed, split, train)
    return fit_candidates(pool, splits, data.classes, score, probe=probe, unlabelled=unlabelled, pseudo=pseudo, spread_probe=plan.spread_probe, seed=config.seed)


def _check_flips(pool: ImageTensors, split, plan: Plan, seed: int) -> Plan:
    """Turn horizontal flips off when they change what images show (digits, text, charts):
    a pixel model that reads mirrored images much worse than the originals says so."""
    from autoft.training.baselines import flips_change_labels, mirror_accuracies
    from autoft.searching.finishing import chance_level

    plain, mirrored = mirror_accuracies(pool, split, seed=seed)
    if not flips_change_labels(plain, mirrored, chance_level(pool.labels.numpy())):
        return plan
    reason = f"no flips: a pixel model read {plain:.2f} of images right and {mirrored:.2f} of their mirror images"
    return dataclasses.replace(plan, flips=False, reasons=[*plan.reasons, reason])


# ---------------------------------------------------------------------------


def _emit(config: SearchConfig, event: Any) -> None:
    if config.on_event is not None:
        config.on_event(event)


def _labelled_source(data: str | DataSplits, registry) -> tuple[Any, str | None]:
    """The dataset plugin's images, not yet decoded (or DataSplits given in memory)."""
    if isinstance(data, DataSplits):
        return data, None
    spec, argument = registry.dataset(data)
    return spec.factory(argument), data


def _data_shape(labelled: Any, unlabelled: int) -> tuple[DataShape, int]:
    """What the planner needs to know of the labelled images (not yet decoded), and their class count."""
    if isinstance(labelled, DataSplits):
        labels = np.concatenate([labelled.train.labels.numpy(), labelled.val.labels.numpy()])
        val_labels = labelled.val.labels.numpy()
        classes = labelled.num_classes
    else:
        every = np.asarray(labelled.labels, dtype=np.int64)
        splits = np.asarray(labelled.splits) if labelled.splits is not None else None
        labels = every[splits != "test"] if splits is not None else every
        given_val = every[splits == "val"] if splits is not None else np.zeros(0, np.int64)
        val_labels = given_val if len(given_val) else labels[: max(1, round(VAL_FRACTION * len(labels)))]
        classes = len(labelled.classes)
    counts = np.bincount(labels, minlength=classes) if len(labels) else np.zeros(1, np.int64)
    val_counts = np.bincount(val_labels, minlength=classes) if len(val_labels) else np.zeros(1, np.int64)
    val_total = int(val_counts.sum())
    if len(val_labels) and not isinstance(labelled, DataSplits) and labelled.splits is None:  # what the stratified split will hold
        val_counts = np.floor(counts * VAL_FRACTION).astype(int)
        val_total = max(int((counts > 0).sum()), round(len(labels) * VAL_FRACTION))
    shape = DataShape(
        labelled=len(labels), val=val_total, smallest_class=int(counts[counts > 0].min()) if counts.any() else 0,
        smallest_val_class=int(val_counts[counts > 0].min()) if counts.any() else 0, unlabelled=unlabelled,
        extra_train=int(PSEUDO_DEFAULT * unlabelled), classes=classes,
    )  # fmt: skip
    return shape, classes


def _before_decoding(shape: DataShape, labelled: Any, side: int | None) -> DataShape:
    """The shape with what decoding will cost: the plan keeps time for it."""
    undecoded = 0 if isinstance(labelled, DataSplits) else len(labelled.samples) + shape.unlabelled
    return dataclasses.replace(shape, undecoded=undecoded, source_side=side)


def _median_side(labelled: Any) -> int | None:
    if isinstance(labelled, DataSplits):
        return labelled.image_size
    if labelled.image_size:  # a source of small images names its size (sample:digits)
        return labelled.image_size
    return median_short_side(labelled.samples)


def _count_unlabelled(source: Any) -> int:
    if source is None:
        return 0
    if isinstance(source, torch.Tensor):
        return len(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return len(image_files(path)) + sum(len(image_files(d)) for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    return 0  # a dataset source: counted when decoded


def _decode_unlabelled(source: Any, size: int, registry) -> tuple[torch.Tensor | None, list[tuple[str, str]]]:
    if source is None:
        return None, []
    from autoft.training.pretraining import Pool, load_pool

    pool = Pool(source) if isinstance(source, torch.Tensor) else load_pool(source, size, registry)
    if pool.images.shape[-1] != size:
        raise AutoftError(f"unlabelled images are {tuple(pool.images.shape[1:])}, the labelled ones (3, {size}, {size})")
    return pool.images, list(pool.skipped)


def _plan(setup: _Setup, shape: DataShape, rates, overrides: Overrides, pretrained: bool, probe: SizeProbe | None = None) -> Plan:
    config = setup.config
    try:
        return make_plan(shape, rates, setup.budget.left(), overrides, pretrained=pretrained, jobs=setup.jobs, backbone=config.backbone, probe=probe, modules=setup.modules)
    except BudgetTooSmall as exc:
        spent = setup.budget.spent()
        raise AutoftError(
            f"--timeout {duration(config.seconds)} cannot hold even the smallest plan (decoding {shape.labelled} images, logistic regression on their pixels) "
            f"on this device after {duration(spent)} of checks and calibration; give it at least {duration(spent + exc.least)}"
        ) from None


def _check_out(out: Path) -> None:
    """An unusable --out fails before any training, in one line."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".autoft-write-test"
        probe.write_text("")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise AutoftError(f"--out {out} is a file, not a folder") from None
    except OSError as exc:
        raise AutoftError(f"--out {out} cannot be written: {exc.strerror or exc}") from None


def features_of(backbone_name: str, num_classes: int, weights: str | None, registry: plugins.Registry, device: torch.device, seed: int):
    """``images -> pooled features`` of the backbone with ``weights``."""
    from autoft.training.pretraining import embed_all

    seed_everything(seed)
    backbone = build_backbone(backbone_name, num_classes=num_classes, weights=weights, registry=registry)
    backbone.model.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lambda images: embed_all(backbone, images, device).numpy()
