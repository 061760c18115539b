"""The Python API behind ``autoft search``: one Optuna study over fine-tuning recipes."""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch
from optuna.trial import TrialState

from autoft import plugins
from autoft.data import DataSplits, load_data
from autoft.errors import AutoftError
from autoft.io import atomic_path, read_json, write_json
from autoft.searching.objective import Event, Objective, SearchSetup, confusion, free_memory, read_confusion, stratified_folds
from autoft.searching.space import DEFAULT_STRATEGIES, SearchSpace, load_overrides
from autoft.searching.storage import counted_trials, default_storage_url, open_storage, recover_trials
from autoft.backbones import build_backbone
from autoft.checkpoints import CHECKPOINT_NAME, load_checkpoint
from autoft.metrics import evaluate, test_metrics
from autoft.runtime import resolve_device

SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "median", "wilcoxon", "none")
VERIFY_IMAGES = 256  # validation images the ONNX export is checked on
BEST_FOLDER = "best"
REPORT_FILE = "report.html"


@dataclass
class SearchResult:
    out: Path
    study_name: str
    storage: str
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    best_dir: Path
    report: Path
    states: dict[str, int]  # trials by state: COMPLETE, PRUNED, FAIL...
    metrics: dict[str, Any]
    seconds: float
    queued_again: list[int] = field(default_factory=list)  # crashed trials run again


# ---------------------------------------------------------------------------
# Small parsers


def parse_duration(text: str | float | int | None) -> float | None:
    """``90s``, ``30m``, ``2h``, ``1h30m`` or plain seconds -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    cleaned = text.strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned or (len(parts) > 1 and not all(u for _, u in parts)):
        raise AutoftError(f"--timeout {text!r}: expected a duration such as 90s, 30m, 2h or 1h30m")
    return sum(float(n) * units[u or "s"] for n, u in parts)


def default_study_name(backbone: str, data: str | DataSplits) -> str:
    """``<backbone>-<dataset>``: ``resnet50-flowers`` for ``--data ~/data/flowers/``."""
    source = data if isinstance(data, str) else "data"
    if ":" in source and not Path(source).expanduser().exists() and not re.match(r"^[A-Za-z]:[\\/]", source):
        source = source.split(":", 1)[1]
    tail = Path(source.rstrip("/\\")).stem or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{backbone}-{tail}").strip("-.") or "search"


def make_sampler(name: str | optuna.samplers.BaseSampler, seed: int) -> optuna.samplers.BaseSampler:
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    if name == "tpe":
        # constant_liar: parallel workers do not all sample next to the same running trial.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AutoftError(f"unknown sampler {name!r}; use {' or '.join(SAMPLERS)}")


def make_pruner(name: str | optuna.pruners.BasePruner | None, epochs: int, cv: int | None) -> optuna.pruners.BasePruner:
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    name = name or ("wilcoxon" if cv else "hyperband")
    if name not in PRUNERS:
        raise AutoftError(f"unknown pruner {name!r}; use {', '.join(PRUNERS)}")
    if cv and name in ("hyperband", "median"):
        raise AutoftError(f"--pruner {name} compares epochs, but with --cv a trial reports one score per fold; use --pruner wilcoxon or none")
    if not cv and name == "wilcoxon":
        raise AutoftError("--pruner wilcoxon compares per-fold scores; use it with --cv K")
    if name == "hyperband":
        # The first epoch is mostly learning-rate warmup: judging a trial on it alone is noise.
        return optuna.pruners.HyperbandPruner(min_resource=2 if epochs >= 4 else 1, max_resource=epochs, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------
# The search


def search(
    backbone: str,
    data: str | DataSplits,
    out: str | Path | None = None,
    *,
    trials: int = 20,
    timeout: str | float | None = None,
    epochs: int = 10,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    storage: str | None = None,
    study: str | None = None,
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    pruner: str | optuna.pruners.BasePruner | None = None,
    metric: str = "accuracy",
    seed: int = 0,
    device: str = "auto",
    cv: int | None = None,
    batch_size: int = 64,
    image_size: int | None = None,
    ranges: Sequence[str] = (),
    space_file: str | Path | None = None,
    space: SearchSpace | None = None,
    export_onnx: bool = True,
    pre_search: Sequence[Callable[[SearchSetup, optuna.Study], None]] = (),
    weights: str | None = None,
    unlabelled: str | Path | torch.Tensor | None = None,
    pretrain: str = "simclr",
    pretrain_epochs: int | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> SearchResult:
    """Search fine-tuning recipes for ``backbone`` on ``data``; write the best model and a report.

    ``trials`` is the total the study should reach: running the same call again resumes,
    keeps every finished trial and runs crashed ones again. ``timeout`` bounds the whole
    call. ``pre_search`` hooks run once the data is decoded and the study is open, within
    the time budget (a pretraining stage may add an ``init`` choice to ``setup.space``).
    ``weights`` (a file or a source's pretrained tag) starts every trial; ``unlabelled``
    (a folder, a dataset source or uint8 images) adds a pretraining stage: ``pretrain``
    runs once on it plus the labelled training images (cached, see :mod:`autoft.pretraining`)
    for ``pretrain_epochs``, or else for a share of ``timeout``, and ``init`` chooses among
    its checkpoints and scratch.
    ``on_event`` receives progress events (``search_start``, ``trial_start``, ``batch``,
    ``epoch``, ``fold``, ``trial_end``, ``retrain``, ``export``, and ``pretrain_start`` and
    ``pretrain_end`` with ``unlabelled``).
    """
    started = time.monotonic()
    seconds = parse_duration(timeout)
    if trials < 1:
        raise AutoftError("--trials must be at least 1")
    if epochs < 1:
        raise AutoftError("--epochs must be at least 1")
    if cv is not None and cv < 2:
        raise AutoftError("--cv needs at least 2 folds")
    if seconds is not None and seconds <= 0:
        raise AutoftError("--timeout must be longer than zero")
    registry = plugins.registry()
    direction = "maximize" if registry.metric(metric).greater_is_better else "minimize"  # an unknown metric fails here
    if not strategies:
        raise AutoftError("give at least one --strategy")
    strategy_objects = {name: registry.strategy(name).factory() for name in dict.fromkeys(strategies)}
    space = space or SearchSpace(tuple(strategy_objects), load_overrides(ranges, space_file))
    pruner_object = make_pruner(pruner, epochs, cv)
    make_sampler(sampler, seed)  # a bad name fails before any image is decoded
    if unlabelled is not None:
        from autoft.pretraining import search_stage

        registry.pretrainer(pretrain)
        if pretrain_epochs is not None and pretrain_epochs < 1:
            raise AutoftError("--pretrain-epochs must be at least 1")
        pre_search = [search_stage(unlabelled, method=pretrain, epochs=pretrain_epochs, timeout=seconds, weights=weights), *pre_search]
    torch_device = resolve_device(device)

    probe = build_backbone(backbone, num_classes=2, weights=weights, registry=registry)  # a bad weights file fails here
    n_groups, input_size = len(probe.groups), probe.input_size
    del probe
    space.check_names(n_groups, strategy_objects)
    data_source = data if isinstance(data, str) else None
    if isinstance(data, str):
        data = load_data(data, image_size=image_size, default_size=input_size, seed=seed, registry=registry)
    folds = stratified_folds(_pool_labels(data), cv, seed) if cv else None

    study_name = study or default_study_name(backbone, data_source or data)
    out = Path(out).expanduser() if out is not None else Path("runs") / study_name
    out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or default_storage_url(out)
    optuna_study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url), direction=direction, pruner=pruner_object, sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
    config = {"backbone": backbone, "weights": weights, "data": data_source, "metric": metric, "cv": cv, "image_size": data.image_size, "num_classes": data.num_classes}
    _check_config(optuna_study, config, study_name)
    queued_again = recover_trials(optuna_study)
    existing = optuna_study.get_trials(deepcopy=False)
    # Same seed, same fresh search; a resumed or parallel worker must not replay the
    # first worker's random draws, so its sampler seed also depends on who and when.
    sampler_seed = seed if not existing and storage is None else zlib.crc32(f"{seed}/{len(existing)}/{socket.gethostname()}/{id(optuna_study)}/{time.time_ns()}".encode())
    optuna_study.sampler = make_sampler(sampler, sampler_seed)

    deadline = None if seconds is None else started + seconds - min(60.0, 0.1 * seconds)  # leave time for export and report
    setup = SearchSetup(
        backbone=backbone, data=data, out=out, space=space, strategies=strategy_objects, n_groups=n_groups, epochs=epochs, metric=metric,
        batch_size=batch_size, device=torch_device, seed=seed, cv=cv, deadline=deadline, data_source=data_source, registry=registry, on_event=on_event, folds=folds,
        weights=weights,
    )
    for hook in pre_search:
        hook(setup, optuna_study)
    if not existing:  # after the hooks, so that the default recipe includes the choices they add
        first = "freeze" if "freeze" in strategy_objects else next(iter(strategy_objects))
        optuna_study.enqueue_trial(space.defaults(first, strategy_objects[first], n_groups), user_attrs={"recipe": "default"})
    info = {"study": study_name, "storage": storage_url, "backbone": backbone, "weights": weights or "scratch", "data": data_source or "(in memory)", "metric": metric, "epochs": epochs, "cv": cv, "trials": trials, "space": space.describe(n_groups, strategy_objects)}

    remaining = trials - counted_trials(optuna_study.get_trials(deepcopy=False))
    setup.emit("search_start", study=study_name, total=trials, done=trials - max(remaining, 0), queued_again=queued_again)
    if remaining > 0 and (deadline is None or time.monotonic() < deadline):
        after_trial = _AfterTrial(setup, trials, info)
        try:
            optuna_study.optimize(
                Objective(setup),
                n_trials=remaining,
                timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                catch=(Exception,),
                callbacks=[after_trial],
                gc_after_trial=False,  # the objective frees what it used
            )
        except KeyboardInterrupt:
            _write_report_quietly(optuna_study, out, info, setup)
            raise
    return finish(optuna_study, setup, info, storage_url, started, queued_again, export_onnx=export_onnx)


def _pool_labels(data: DataSplits):
    import numpy as np

    return np.concatenate([data.train.labels.numpy(), data.val.labels.numpy()])


def _check_config(study: optuna.Study, config: dict[str, Any], name: str) -> None:
    stored = study.user_attrs.get("autoft")
    if stored is None:
        study.set_user_attr("autoft", config)
        return
    for key in ("backbone", "weights", "metric", "cv", "num_classes"):
        if stored.get(key) != config[key]:
            raise AutoftError(
                f"study {name!r} in this storage was started with {key} {stored.get(key)!r}, not {config[key]!r}; "
                "pass another --study (or --out) to start a new search"
            )


class _AfterTrial:
    """After each trial: drop checkpoints that cannot be the best, refresh the report, stop at the total."""

    def __init__(self, setup: SearchSetup, total: int, info: dict[str, Any]):
        self.setup, self.total, self.info = setup, total, info

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        all_trials = study.get_trials(deepcopy=False)
        best = _best_trial(study)
        prune_checkpoints(self.setup.out, all_trials, best)
        _write_report_quietly(study, self.setup.out, self.info, self.setup)
        self.setup.emit(
            "trial_end", number=trial.number, state=trial.state.name, value=trial.value, reason=trial.user_attrs.get("fail_reason"),
            best_value=best.value if best else None, best_number=best.number if best else None, done=counted_trials(all_trials), total=self.total,
        )
        if counted_trials(all_trials) - _running(all_trials) >= self.total:
            study.stop()  # other workers have reached the total too


def _running(trials) -> int:
    return sum(t.state == TrialState.RUNNING for t in trials)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial completed yet
        return None


def prune_checkpoints(out: Path, trials: list[optuna.trial.FrozenTrial], best: optuna.trial.FrozenTrial | None) -> None:
    """Keep the checkpoints of the best trial, of unfinished ones, and of crashed ones whose
    retry has not started yet (it resumes from them); delete the rest."""
    folder = out / "trials"
    if not folder.is_dir():
        return
    keep = {t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    resumed = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs and t.state != TrialState.WAITING}
    keep |= {t.number for t in trials if t.user_attrs.get("crashed") and t.number not in resumed}
    if best is not None:
        keep.add(best.number)
    for child in folder.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) not in keep:
            shutil.rmtree(child, ignore_errors=True)


def _write_report_quietly(study: optuna.Study, out: Path, info: dict[str, Any], setup: SearchSetup) -> None:
    """A report failure must never stop a search; say so and go on."""
    from autoft.report import write_report

    try:
        best = _best_trial(study)
        matrix = read_confusion(setup.trial_dir(best.number)) if best else None
        write_report(study, out / REPORT_FILE, info=info, classes=setup.data.classes, confusion=matrix)
    except Exception as exc:  # noqa: BLE001 - matplotlib and importance errors vary
        warnings.warn(f"could not write {REPORT_FILE}: {type(exc).__name__}: {exc}", stacklevel=2)


# ---------------------------------------------------------------------------
# The best model


def finish(study: optuna.Study, setup: SearchSetup, info: dict[str, Any], storage_url: str, started: float, queued_again: list[int], *, export_onnx: bool = True) -> SearchResult:
    """Put the best trial's model in ``best/`` with its metrics and ONNX export; write the report."""
    from autoft.report import write_report

    all_trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in all_trials) for s in TrialState if any(t.state == s for t in all_trials)}
    best = _best_trial(study)
    if best is None:
        reasons = [f"trial {t.number}: {t.user_attrs['fail_reason']}" for t in all_trials if t.user_attrs.get("fail_reason")]
        _write_report_quietly(study, setup.out, info, setup)
        if setup.deadline is not None and time.monotonic() > setup.deadline and not states.get("COMPLETE"):
            raise AutoftError("the time budget (--timeout) ran out before any trial completed an epoch; give the search more time or fewer --epochs")
        raise AutoftError(f"no trial completed ({', '.join(f'{n} {k.lower()}' for k, n in states.items()) or 'none ran'})" + (f"; {reasons[0]}" if reasons else ""))
    best_dir = setup.out / BEST_FOLDER
    metrics = _current_best(best_dir, best.number, export_onnx)
    if metrics is None:
        metrics = _build_best(study, best, setup, best_dir, export_onnx)
    write_report(study, setup.out / REPORT_FILE, info=info, classes=setup.data.classes, confusion=metrics.get("confusion"))
    return SearchResult(
        out=setup.out, study_name=study.study_name, storage=storage_url, best_number=best.number, best_value=float(best.value), best_params=dict(best.params),
        best_dir=best_dir, report=setup.out / REPORT_FILE, states=states, metrics=metrics, seconds=time.monotonic() - started, queued_again=queued_again,
    )


def _current_best(best_dir: Path, number: int, export_onnx: bool) -> dict[str, Any] | None:
    """The metrics of ``best/`` when it already holds trial ``number`` completely (a rerun)."""
    try:
        metrics = read_json(best_dir / "metrics.json")
    except (OSError, ValueError):
        return None
    complete = (best_dir / CHECKPOINT_NAME).is_file() and (not export_onnx or "onnx_check" in metrics)
    return metrics if metrics.get("trial") == number and complete else None


def _build_best(study: optuna.Study, best: optuna.trial.FrozenTrial, setup: SearchSetup, best_dir: Path, export_onnx: bool) -> dict[str, Any]:
    checkpoint = setup.trial_dir(best.number) / CHECKPOINT_NAME
    if not checkpoint.is_file():
        # Cross-validated trials keep no weights, and the best trial may have run on
        # another machine: train its recipe again on the train split (FixedTrial).
        setup.emit("retrain", number=best.number)
        Objective(dataclasses.replace(setup, cv=None, deadline=None))(optuna.trial.FixedTrial(best.params, best.number))
    best_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(best_dir / CHECKPOINT_NAME) as tmp:
        shutil.copyfile(checkpoint, tmp)
    loaded = load_checkpoint(best_dir, registry=setup.registry)
    net = loaded.network().to(setup.device)
    val = evaluate(net, setup.data.val, setup.device, setup.batch_size * 2)
    metrics: dict[str, Any] = {
        "study": study.study_name,
        "trial": best.number,
        "metric": setup.metric,
        "value": float(best.value),
        **({"cv_folds": setup.cv} if setup.cv else {}),
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_f1_macro": val["f1_macro"],
        **test_metrics(net, setup.data, setup.device, setup.batch_size * 2),
        "num_train": len(setup.data.train),
        "num_val": len(setup.data.val),
        "num_test": len(setup.data.test) if setup.data.test is not None else 0,
        "params": dict(best.params),
        "epochs": best.user_attrs.get("history", []),
        "confusion": confusion(setup.data.val.labels, val["predictions"], setup.data.num_classes),
    }
    del net
    if export_onnx:
        from autoft.exporting import export

        setup.emit("export", number=best.number)
        images = setup.data.val.subset(range(min(VERIFY_IMAGES, len(setup.data.val))))
        exported = export(loaded, best_dir, images=images, registry=setup.registry)
        metrics["onnx_check"] = exported.report.get("checks", {})
    else:
        write_json(best_dir / "labels.json", setup.data.classes)
    free_memory(setup.device)
    write_json(best_dir / "metrics.json", metrics)
    return metrics
