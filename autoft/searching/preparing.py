"""Before the first trial: weights, calibration, the plan, decoding, the study, pretraining, baselines."""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from autoft import plugins
from autoft.backbones import build_backbone, describe_backbone
from autoft.data import DataSplits, ImageTensors, image_files, prepare as decode_and_split
from autoft.errors import AutoftError
from autoft.events import PlanMade, WeightsNotice
from autoft.metrics import metric_specs, score as metric_score
from autoft.planning import BudgetTooSmall, DataShape, Overrides, Plan, calibrate, candidate_sizes, duration, make_plan, median_short_side
from autoft.runtime import resolve_device, seed_everything
from autoft.searching.config import SearchConfig, default_study_name
from autoft.searching.session import PSEUDO_DEFAULT, Session, fit_baselines, make_splits
from autoft.searching.space import DEFAULT_STRATEGIES, SearchSpace, load_overrides
from autoft.searching.storage import default_storage_url, open_storage
from autoft.searching.workers import WorkerSpec, resolve_jobs, threads_per_job, torch_threads
from autoft.weights import resolve_weights

VAL_FRACTION = 0.2
EMBED_SHARE = 0.05  # of the budget: what embedding every image for pseudo-labels may cost
CALIBRATION_BATCH = 32


def prepare(config: SearchConfig, worker: WorkerSpec | None = None) -> Session:
    """Everything before the first trial. A ``--jobs`` worker process passes its
    :class:`~autoft.searching.workers.WorkerSpec`: it takes the command's plan and deadline
    instead of measuring and planning again."""
    started = time.monotonic()
    config.check()
    registry = plugins.registry()
    strategies = {name: registry.strategy(name).factory() for name in dict.fromkeys(config.strategies or DEFAULT_STRATEGIES)}
    metric_specs(config.metric, registry)  # an unknown metric fails here
    if config.unlabelled is not None:
        registry.pretrainer(config.pretrain)
    info = describe_backbone(config.backbone, registry)
    space = config.space or SearchSpace(tuple(strategies), load_overrides(config.ranges, config.space_file))
    space.check_names(info.num_groups, strategies)
    device = resolve_device(config.device)
    jobs = 1 if worker is not None else resolve_jobs(config.jobs, device)
    weights, notice = resolve_weights(config.weights, config.backbone, registry)
    if notice:
        _emit(config, WeightsNotice(notice))
    build_backbone(config.backbone, num_classes=2, weights=weights, registry=registry)  # a bad weights file fails before decoding

    labelled_images, data_source = _labelled_source(config.data, registry)
    timings: dict[str, float] = {}
    pretrained = weights is not None
    if worker is None:
        shape, classes = _data_shape(labelled_images, _count_unlabelled(config.unlabelled))
        clock = time.monotonic()
        side = _median_side(config.data, labelled_images)
        shape = _before_decoding(shape, labelled_images, side)
        sizes = [config.image_size] if config.image_size else candidate_sizes(side, info.input_size, pretrained)
        make_model = lambda: build_backbone(config.backbone, num_classes=max(2, classes), registry=registry).model
        with torch_threads(threads_per_job(jobs)):  # what one of the --jobs workers will have
            rates = calibrate(make_model, sizes, config.batch_size or CALIBRATION_BATCH, device, max(2, classes))
        timings["calibration"] = time.monotonic() - clock
        overrides = Overrides(image_size=config.image_size, epochs=config.epochs, trials=config.trials, pretrain_epochs=config.pretrain_epochs, cv=config.cv, no_cv=config.no_cv, batch_size=config.batch_size)
        plan = _plan(config, shape, rates, overrides, started, pretrained, jobs)
    else:
        plan = worker.plan

    clock = time.monotonic()
    data = labelled_images if isinstance(labelled_images, DataSplits) else decode_and_split(labelled_images, image_size=plan.image_size, val_fraction=VAL_FRACTION, seed=config.seed)
    unlabelled, unlabelled_skipped = _decode_unlabelled(config.unlabelled, data.image_size, registry)
    timings["decoding"] = time.monotonic() - clock
    if worker is None:
        plan = _plan(config, _data_shape(data, 0 if unlabelled is None else len(unlabelled))[0], rates, replace(overrides, image_size=data.image_size), started, pretrained, jobs)  # what decoding left, at the size decoded
    if worker is not None and not plan.flips:
        data.hflip = False
    pool = ImageTensors.concat([data.train, data.val])
    splits = make_splits(pool.labels.numpy(), len(data.train), plan.folds, plan.repeats, config.seed)

    study_name = config.study or default_study_name(config.backbone, data_source or data)
    out = Path(config.out).expanduser() if config.out is not None else Path("runs") / study_name
    _check_out(out)
    storage_url = config.storage or default_storage_url(out, jobs)
    direction = "maximize" if registry.metric(config.metric).greater_is_better else "minimize"
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url), direction=direction, sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
    if worker is not None:
        deadline = worker.monotonic_deadline()
    else:
        deadline = None if config.seconds is None else started + config.seconds
    session = Session(
        config=config, registry=registry, device=device, data=data, pool=pool, splits=splits, plan=plan, study=study, out=out, space=space,
        strategies=strategies, n_groups=info.num_groups, weights=weights, started=started, unlabelled=unlabelled, data_source=data_source,
        timings=timings, on_event=config.on_event, storage_url=storage_url, unlabelled_skipped=unlabelled_skipped, deadline=deadline,
        jobs=jobs, worker=0 if worker is None else worker.index,
    )  # fmt: skip
    return session


def finish_preparing(session: Session) -> None:
    """The stages that need the open study: pretraining, pseudo-label features, baselines."""
    config = session.config
    if session.data.hflip:
        _check_flips(session)
    _emit(config, PlanMade(session.plan.line(), session.plan.as_dict()))
    session.study.set_user_attr("plan", session.plan.as_dict())  # for the dashboard: the plan as the data left it
    if session.unlabelled is not None:
        from autoft.searching.pretraining_stage import run_pretraining

        with session.timed("pretraining"):
            run_pretraining(session)
        session.space.choices["pseudo_labels"] = ["propagate", "none"]
        if "fixmatch" not in session.space.regularizers and not session.space.overrides.get("regularizer"):
            session.space.regularizers = (*session.space.regularizers, "fixmatch")
    spec = session.registry.metric(config.metric)
    score = lambda labels, probabilities: metric_score(spec, labels, probabilities, session.registry)
    with session.timed("baselines"):
        embed = _embedder(session, session.weights)
        if embed is not None and session.weights is not None:
            session.embedders["start"] = embed
            session.embedder_weights["start"] = session.weights
        session.baselines = fit_baselines(session, score, embed)


def _check_flips(session: Session) -> None:
    """Turn horizontal flips off when they change what images show (digits, text, charts):
    a pixel model that reads mirrored images much worse than the originals says so."""
    from autoft.baselines import flips_change_labels, mirror_accuracies
    from autoft.searching.finishing import chance_level

    plain, mirrored = mirror_accuracies(session.pool, session.splits[0], seed=session.config.seed)
    if flips_change_labels(plain, mirrored, chance_level(session.pool.labels.numpy())):
        session.data.hflip = session.plan.flips = False
        session.plan.reasons.append(f"no flips: a pixel model read {plain:.2f} of images right and {mirrored:.2f} of their mirror images")


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
    return replace(shape, undecoded=undecoded, source_side=side)


def _median_side(data: Any, labelled: Any) -> int | None:
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
    from autoft.pretraining import Pool, load_pool

    pool = Pool(source) if isinstance(source, torch.Tensor) else load_pool(source, size, registry)
    if pool.images.shape[-1] != size:
        raise AutoftError(f"unlabelled images are {tuple(pool.images.shape[1:])}, the labelled ones (3, {size}, {size})")
    return pool.images, list(pool.skipped)


def _plan(config: SearchConfig, shape: DataShape, rates, overrides: Overrides, started: float, pretrained: bool, jobs: int) -> Plan:
    budget = None if config.seconds is None else config.seconds - (time.monotonic() - started)
    try:
        return make_plan(shape, rates, budget, overrides, pretrained=pretrained, jobs=jobs, backbone=config.backbone)
    except BudgetTooSmall as exc:
        spent = time.monotonic() - started
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


def _embedder(session: Session, weights: str | None):
    """Pooled features of the starting weights, when embedding every image is cheap enough."""
    total = len(session.pool) + (0 if session.unlabelled is None else len(session.unlabelled))
    budget = session.config.seconds
    if budget is not None and total * session.plan.step_seconds / max(session.plan.batch_size, 1) / 3 > EMBED_SHARE * budget:
        return None
    return features_of(session, weights)


def features_of(session: Session, weights: str | None):
    """``images -> pooled features`` of the backbone with ``weights``."""
    from autoft.pretraining import embed_all

    seed_everything(session.config.seed)
    backbone = build_backbone(session.config.backbone, num_classes=session.data.num_classes, weights=weights, registry=session.registry)
    backbone.model.to(session.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lambda images: embed_all(backbone, images, session.device).numpy()
