"""``autoft search``: a hyperparameter search over fine-tuning recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from autoft.cli.common import bare_seconds_warning, console, guarded
from autoft.cli.progress import LazyProgress


class SearchProgress(LazyProgress):
    """Live progress: trial n of N with the best so far, and the running trial's epoch."""

    def __init__(self, epochs: int, metric: str):
        super().__init__()  # the same columns as autoft train
        self.epochs, self.metric = epochs, metric
        self.trials = self.running = None

    def _add_tasks(self) -> None:
        self.trials = self.progress.add_task("trials", total=None, status="")
        self.running = self.progress.add_task("", total=None, status="", visible=False)

    def __call__(self, event: dict[str, Any]) -> None:
        self._start()
        kind = event["kind"]
        if kind == "search_start":
            self.progress.update(self.trials, total=event["total"], completed=event["done"])
            if event["queued_again"]:
                self._say(f"running again trial(s) {', '.join(map(str, event['queued_again']))}, left unfinished by a crash or an interrupt")
        elif kind == "trial_start":
            self.progress.update(self.running, description=f"trial {event['number']} epoch 1/{self.epochs}", completed=0, total=None, status="", visible=True)
        elif kind == "batch":
            self.progress.update(self.running, completed=event["step"], total=event["steps"])
        elif kind == "epoch":
            following = min(event["epoch"] + 1, event["epochs"])
            self.progress.update(self.running, description=f"trial {event['number']} epoch {following}/{event['epochs']}", status=f"val {self.metric} {event['value']:.4f} at epoch {event['epoch']}")
        elif kind == "fold":
            self.progress.update(self.running, description=f"trial {event['number']} fold {event['fold']}/{event['folds']}", status=f"fold {self.metric} {event['value']:.4f}")
        elif kind == "trial_end":
            self._trial_end(event)
        elif kind == "retrain":
            self.progress.update(self.running, description=f"retraining best trial {event['number']}", visible=True, completed=0, total=None, status="")
        elif kind == "export":
            self.progress.update(self.running, description=f"exporting trial {event['number']} to ONNX", visible=True, total=None, status="")
        elif kind == "pretrain_start":
            self.progress.update(self.running, description=f"pretraining ({event['method']}) on {event['images']} images", visible=True, total=None, status="")
        elif kind == "pretrain_end":
            scores = ", ".join(f"epoch {e}" + (f" k-NN {a:.3f}" if a is not None else "") for e, a in event["checkpoints"])
            self._say(f"pretraining {'reused from' if event['cached'] else 'saved in'} {event['out']}: {scores}")
            self.progress.update(self.running, visible=False)

    def _trial_end(self, event: dict[str, Any]) -> None:
        state = event["state"]
        if state == "COMPLETE":
            line = f"trial {event['number']}: {self.metric} {event['value']:.4f}"
        elif state == "PRUNED":
            line = f"trial {event['number']}: [yellow]pruned[/yellow]"
        else:
            line = f"trial {event['number']}: [red]{state.lower()}[/red] {event.get('reason') or ''}"
        best = event["best_value"]
        status = f"best {self.metric} {best:.4f} (trial {event['best_number']})" if best is not None else "no trial completed yet"
        self._say(line)
        self.progress.update(self.trials, completed=min(event["done"], event["total"]), status=status)
        self.progress.update(self.running, visible=False)

    def _say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)


def search_command(
    backbone: Annotated[str, typer.Option(help="Backbone: a timm model name, or SOURCE:MODEL from another plugin.")],
    data: Annotated[str, typer.Option(help="DIR/<class>/*, DIR/{train,val,test}/<class>/*, a CSV manifest, or sample:digits.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the study, best/ and report.html. \\[default: runs/<study>]")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials the study should hold in total; a rerun resumes up to this number.")] = 20,
    timeout: Annotated[Optional[str], typer.Option(metavar="DURATION", callback=bare_seconds_warning, help="Time budget for the whole command: 90s, 30m, 2h, 1h30m. \\[default: no limit]")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="The most epochs a trial may run (the pruner may stop it sooner).")] = 10,
    strategy: Annotated[list[str], typer.Option(help="A strategy to search over; repeatable. \\[default: freeze, l2sp]")] = [],
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage: sqlite:///FILE, postgresql://..., or a journal FILE.log. \\[default: sqlite:///<out>/study.db]")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name; one name and one storage on many machines make one search. \\[default: <backbone>-<data>]")] = None,
    sampler: Annotated[str, typer.Option(help="tpe or random.")] = "tpe",
    pruner: Annotated[Optional[str], typer.Option(help="hyperband, median, wilcoxon (with --cv) or none. \\[default: hyperband; wilcoxon with --cv]")] = None,
    metric: Annotated[str, typer.Option(help="accuracy or f1_macro, on the validation split.")] = "accuracy",
    cv: Annotated[Optional[int], typer.Option(min=2, help="Score each trial as the mean over K stratified folds (small datasets).")] = None,
    range_: Annotated[list[str], typer.Option("--range", metavar="NAME=RANGE", help="Override a range: NAME=LOW:HIGH[:log], NAME=VALUE or NAME=A,B,C. Repeatable.")] = [],
    space: Annotated[Optional[Path], typer.Option(help="A JSON file of range overrides, {NAME: \"LOW:HIGH[:log]\", ...}.")] = None,
    batch_size: Annotated[int, typer.Option(min=2, help="Images per batch.")] = 64,
    image_size: Annotated[Optional[int], typer.Option(min=8, help="Training image size. \\[default: the dataset's or backbone's]")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling and training.")] = 0,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Export the best model to best/model.onnx, checked against PyTorch.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    weights: Annotated[
        Optional[str],
        typer.Option(
            metavar="PATH|TAG",
            help="Starting weights for every trial: a state-dict/.safetensors PATH, or a pretrained tag the source can fetch. \\[default: random initialisation; with --unlabelled, `init` chooses among its checkpoints and scratch]",
        ),
    ] = None,
    unlabelled: Annotated[
        Optional[str],
        typer.Option(help="Unlabelled images (a folder, flat or by class) to pretrain on first; `init` then searches each pretraining checkpoint and scratch (or --weights)."),
    ] = None,
    pretrain: Annotated[str, typer.Option(help="Pretraining method for --unlabelled (see `autoft plugins`).")] = "simclr",
    pretrain_epochs: Annotated[
        Optional[int], typer.Option(min=1, help="Pretraining epochs. \\[default: 30% of --timeout, at most 50; 50 without --timeout]")
    ] = None,
) -> None:
    """Search learning rate, dropout, weight decay, freeze depth and strategy; keep the best model.

    Default ranges: lr 1e-5 to 1e-2 (log), dropout 0 to 0.5, weight_decay 1e-6 to 0.1 (log),
    freeze_depth 0 to the groups before the head, l2sp_alpha 1e-4 to 1 (log).
    """
    import optuna

    from autoft.searching import DEFAULT_STRATEGIES, search

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress display reports each trial
    with SearchProgress(epochs, metric) as progress:
        result = search(
            backbone, data, out, trials=trials, timeout=timeout, epochs=epochs, strategies=strategy or DEFAULT_STRATEGIES, storage=storage, study=study,
            sampler=sampler, pruner=pruner, metric=metric, seed=seed, device=device, cv=cv, batch_size=batch_size, image_size=image_size,
            ranges=range_, space_file=space, export_onnx=onnx, weights=weights, unlabelled=unlabelled, pretrain=pretrain, pretrain_epochs=pretrain_epochs, on_event=progress,
        )
    m = result.metrics
    states = ", ".join(f"{n} {s.lower()}" for s, n in result.states.items())
    summary = f"best trial {result.best_number}: val {metric} {m['value']:.4f}"
    if f"test_{metric}" in m:
        summary += f", test {metric} {m[f'test_{metric}']:.4f}"
    console.print(f"[green]done:[/green] {summary} ({states}; {result.seconds:.0f}s)")
    console.print(f"best model in {result.best_dir}, report in {result.report}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("search")(guarded(search_command))
