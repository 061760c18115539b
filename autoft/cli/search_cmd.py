"""``autoft search``: a hyperparameter search over fine-tuning recipes."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from autoft.cli import STARTED
from autoft.cli.common import bare_seconds_warning, console, guarded
from autoft.cli.progress import LazyProgress, decoding_progress
from autoft.core.events import (
    BatchEnd, EpochEnd, Event, Export, FoldEnd, PlanMade, PretrainEnd, PretrainStart, Refit, SearchStart, TrialEnd, TrialEvent, TrialStart, WeightsNotice,
    WorkerFailed,
)  # fmt: skip
from autoft.core.text import duration

# Optuna's state names, as the summary line says them: a WAITING trial was queued (a retry, the
# default recipe, an --enqueue) and never started before the search ended; a resumed search runs it.
STATE_WORDS = {"WAITING": "queued, not run"}


class SearchProgress(LazyProgress):
    """Live progress: trials done with the best so far and the time left; the running trial's evaluations."""

    def __init__(self, metric: str, budget: float | None):
        super().__init__()  # the same columns as autoft train
        self.metric, self.budget, self.began = metric, budget, time.monotonic()
        self.trials = self.running = None
        self.status = ""

    def _add_tasks(self) -> None:
        self.trials = self.progress.add_task("trials", total=None, status="")
        self.running = self.progress.add_task("", total=None, status="", visible=False)

    def __call__(self, event: Event) -> None:
        if isinstance(event, WeightsNotice):  # before decoding: its progress bar must not be hidden by ours
            console.print(f"[yellow]note:[/yellow] {event.text}", highlight=False)
            return
        self._start()
        match event:
            case PlanMade(line=line):
                self._say(f"[bold]{line}[/bold]")
            case SearchStart(total=total, done=done, queued_again=again):
                self.progress.update(self.trials, total=total, completed=done)
                if again:
                    self._say(f"running again trial(s) {', '.join(map(str, again))}, left unfinished by a crash or an interrupt")
            case TrialStart(number=number):
                self.progress.update(self.running, description=f"trial {number}", completed=0, total=None, status="", visible=True)
            case TrialEvent(number=number, event=BatchEnd(global_step=step, total_steps=steps)):
                self.progress.update(self.running, completed=step, total=steps)
                self._tick()
            case TrialEvent(number=number, event=EpochEnd(epoch=epoch, epochs=epochs, value=value)):
                self.progress.update(self.running, description=f"trial {number} evaluation {epoch}/{epochs}", status=f"val {self.metric} {value:.4f}")
            case FoldEnd(number=number, fold=fold, folds=folds, value=value):
                self.progress.update(self.running, description=f"trial {number} fold {fold}/{folds}", status=f"fold {self.metric} {value:.4f}")
            case TrialEnd():
                self._trial_end(event)
            case WorkerFailed(worker=worker, reason=reason):
                self._say(f"[yellow]worker {worker} stopped:[/yellow] {reason}")
            case Refit(number=number, steps=steps, images=images, model=model, seed=seed):
                what = model or f"trial {number}" + (f" from seed {seed}" if seed is not None else "")
                self.progress.update(self.running, description=f"refitting {what} on {images} labelled images", visible=True, completed=0, total=steps or None, status="")
            case Export(number=number):
                self.progress.update(self.running, description="exporting the best model to ONNX", visible=True, total=None, status="")
            case PretrainStart(method=method, images=images):
                self.progress.update(self.running, description=f"pretraining ({method}) on {images} images", visible=True, total=None, status="")
            case PretrainEnd(cached=cached, out=out, checkpoints=checkpoints):
                scores = ", ".join(f"epoch {e}" + (f" k-NN {a:.3f}" if a is not None else "") for e, a in checkpoints)
                self._say(f"pretraining {'reused from' if cached else 'saved in'} {out}: {scores}")
                self.progress.update(self.running, visible=False)

    def _tick(self) -> None:
        if self.budget is not None:
            left = max(0.0, self.budget - (time.monotonic() - self.began))
            self.progress.update(self.trials, status=f"{self.status}  {duration(left)} of {duration(self.budget)} left")

    def _trial_end(self, event: TrialEnd) -> None:
        if event.state == "COMPLETE":
            line = f"trial {event.number}: {self.metric} {event.value:.4f}"
        elif event.state == "PRUNED":
            line = f"trial {event.number}: [yellow]pruned[/yellow]"
        else:
            line = f"trial {event.number}: [red]{event.state.lower()}[/red] {event.reason or ''}"
        self.status = f"best {self.metric} {event.best_value:.4f} (trial {event.best_number})" if event.best_value is not None else "no trial completed yet"
        self._say(line)
        self.progress.update(self.trials, completed=event.done, total=max(event.total, event.done), status=self.status)
        self.progress.update(self.running, visible=False)
        self._tick()

    def say(self, text: str) -> None:
        self._start()
        self._say(text)

    def _say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)


def search_command(
    ctx: typer.Context,
    backbone: Annotated[str, typer.Option(help="Backbone: a timm model name, or SOURCE:MODEL from another plugin.")],
    data: Annotated[str, typer.Option(help="DIR/<class>/*, DIR/{train,val,test}/<class>/*, a CSV manifest, or sample:digits.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the study, best/ and report.html. \\[default: runs/<study>]")] = None,
    timeout: Annotated[Optional[str], typer.Option(metavar="DURATION", callback=bare_seconds_warning, help="Time budget for the whole command: 90s, 30m, 2h, 1h30m. The plan (image size, training length, folds, trials) is made to fit it. \\[default: no limit]")] = None,
    trials: Annotated[Optional[int], typer.Option(min=1, help="The most trials the study may hold; a rerun resumes up to it. \\[default: as many as --timeout allows; 20 without it]")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs a trial trains, evaluated after each. \\[default: planned in steps from the data and the budget]")] = None,
    strategy: Annotated[list[str], typer.Option(help="A strategy to search over; repeatable. \\[default: freeze, l2sp, lp-ft]")] = [],
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage: sqlite:///FILE, postgresql://..., or a journal FILE.log. \\[default: sqlite:///<out>/study.db]")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name; one name and one storage on many machines make one search. \\[default: <backbone>-<data>]")] = None,
    sampler: Annotated[str, typer.Option(help="tpe or random.")] = "tpe",
    pruner: Annotated[Optional[str], typer.Option(help="hyperband, median, wilcoxon (cross-validated) or none. \\[default: hyperband; wilcoxon when cross-validated]")] = None,
    metric: Annotated[str, typer.Option(help="The metric trials are chosen on (see `autoft plugins`): accuracy, f1_macro, balanced_accuracy, ...")] = "accuracy",
    cv: Annotated[Optional[int], typer.Option(min=2, help="Score each trial over K stratified folds. \\[default: 5 or fewer folds when a validation split would hold under 300 images]")] = None,
    no_cv: Annotated[bool, typer.Option("--no-cv", help="Keep a single validation split, however small.")] = False,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Train the chosen recipe once more on every labelled image; --no-refit keeps the best trial's own weights.")] = True,
    ensemble: Annotated[int, typer.Option(min=1, help="The most models the shipped one may average: trials of a greedy ensemble, or fits of the chosen recipe from other seeds in the time left at the end; 1 ships one model.")] = 5,
    simple_models: Annotated[bool, typer.Option("--simple-models/--no-simple-models", help="Ship a simple model (logistic regression, linear probe) when it beats every trial; --no-simple-models ships a fine-tuned network always.")] = True,
    jobs: Annotated[str, typer.Option(metavar="N|auto", help="Trials to run at once, as worker processes on one study: they divide a CPU's cores, or take a GPU each. auto: one per GPU, 1 on a CPU.")] = "1",
    range_: Annotated[list[str], typer.Option("--range", metavar="NAME=RANGE", help="Override a range: NAME=LOW:HIGH[:log], NAME=VALUE or NAME=A,B,C. Repeatable.")] = [],
    space: Annotated[Optional[Path], typer.Option(help="A JSON file of range overrides, {NAME: \"LOW:HIGH[:log]\", ...}.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=2, help="Images per batch. \\[default: 64, less for tiny datasets]")] = None,
    image_size: Annotated[Optional[int], typer.Option(min=8, help="Training image size. \\[default: the images' median short side, from 32 up to the backbone's size]")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling and training.")] = 0,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Export the best model to best/model.onnx, checked against PyTorch.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    weights: Annotated[
        str,
        typer.Option(metavar="auto|scratch|PATH|TAG", help="Starting weights for every trial: auto (a weights plugin's, else the source's pretrained weights when at hand, else random; said out loud), scratch, a state-dict/.safetensors PATH, a pretrained tag, or plugin:NAME (a weights plugin's)."),
    ] = "auto",
    unlabelled: Annotated[
        Optional[str],
        typer.Option(help="Unlabelled images (a folder, flat or by class): a pretraining stage whose checkpoints `init` searches, and pseudo-labels the search may train on."),
    ] = None,
    pretrain: Annotated[str, typer.Option(help="Pretraining method for --unlabelled (see `autoft plugins`).")] = "simclr",
    pretrain_epochs: Annotated[Optional[int], typer.Option(min=1, help="Pretraining epochs. \\[default: planned, about 20% of --timeout]")] = None,
) -> None:
    """Search how to fine-tune BACKBONE on your images within --timeout; keep, refit and export the best model.

    Searched: learning rate, dropout, weight decay, label smoothing, augmentation, strategy
    (freeze depth, L2-SP, LP-FT), regulariser (mixup, cutmix, BSS); from pretrained weights also
    layer-wise lr decay (lr_decay) and BatchNorm statistics adapted or kept (bn); with --unlabelled
    the pretraining checkpoint and the pseudo-labels. Ranges: `autoft search ... --range NAME=...`.
    """
    import optuna

    from autoft.core.runtime import graceful_interrupts, stop_signal
    from autoft.searching import parse_duration, search

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress display reports each trial
    stopping = lambda: progress.say("[yellow]stopping after this batch; Ctrl-C again to abort[/yellow]")  # noqa: E731
    with SearchProgress(metric, parse_duration(timeout)) as progress, graceful_interrupts(stopping), decoding_progress():
        try:
            result = search(
                backbone, data, out, trials=trials, timeout=timeout, epochs=epochs, strategies=strategy, storage=storage, study=study, sampler=sampler, pruner=pruner,
                metric=metric, seed=seed, device=device, cv=cv, no_cv=no_cv, refit=refit, ensemble=ensemble, simple_models=simple_models, jobs=_jobs(jobs), started=ctx.meta.get(STARTED), batch_size=batch_size, image_size=image_size,
                ranges=range_, space_file=space, export_onnx=onnx, weights=weights, unlabelled=unlabelled, pretrain=pretrain, pretrain_epochs=pretrain_epochs, on_event=progress,
            )  # fmt: skip
        except KeyboardInterrupt:
            signal_number = stop_signal()
            if signal_number is None or signal_number == signal.SIGINT:
                raise  # Ctrl-C: "interrupted", exit 130
            name = signal.Signals(signal_number).name
            console.print(f"[yellow]stopped by {name}:[/yellow] the running trial will run again when the same command runs again", highlight=False)
            raise typer.Exit(128 + signal_number) from None
    _print_summary(result, metric)


def _jobs(text: str) -> int | str:
    from autoft.errors import AutoftError

    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise AutoftError(f"--jobs {text!r}: give a number of trials to run at once, or auto") from None


def _print_summary(result, metric: str) -> None:
    from autoft.cli.leaderboard import leaderboard
    from autoft.searching.report_data import Baseline
    from autoft.searching.records import visible

    m = result.metrics
    study = _study(result)
    if study is not None:
        baselines = [Baseline(b["name"], b["value"]) for b in m.get("baselines", [])]
        console.print(leaderboard(visible(study.get_trials(deepcopy=False)), metric, baselines=baselines), crop=False)  # whole in a log
    states = ", ".join(f"{n} {STATE_WORDS.get(s, s.lower())}" for s, n in result.states.items())
    line = m["summary"] + (f"; test {metric} {m[f'test_{metric}']:.4f}" if f"test_{metric}" in m else "")
    colour = "yellow" if m.get("beat_baselines") is False or m.get("warning") else "green"
    tail = f"{states}; {result.seconds:.0f}s" if states else f"{result.seconds:.0f}s"  # no trials: the seconds alone
    console.print(f"[{colour}]done:[/{colour}] {line} ({tail})", highlight=False)
    if m.get("warning"):
        console.print(f"[yellow]warning:[/yellow] {m['warning']}", highlight=False)
    for note in m.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"best model in {result.best_dir}, report in {result.report}", highlight=False)


def _study(result):
    import optuna

    from autoft.searching.storage import open_storage

    try:
        return optuna.load_study(study_name=result.study_name, storage=open_storage(result.storage))
    except Exception:  # noqa: BLE001 - the summary line still tells the essentials
        return None


def register(app: typer.Typer) -> None:
    app.command("search")(guarded(search_command))
