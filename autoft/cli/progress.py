"""Rich progress for training epochs."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autoft.cli.common import console


class EpochProgress:
    """A bar per epoch's batches, and a line per finished epoch with loss and accuracy."""

    def __init__(self, epochs: int, label: str = "epoch"):
        self.epochs = epochs
        self.label = label
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.epoch = 1

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.__exit__(*exc)

    def _start(self) -> None:
        # Shown from the first batch on, so errors while loading data print cleanly.
        if self.task is None:
            self.progress.__enter__()
            self.task = self.progress.add_task(f"{self.label} 1/{self.epochs}", total=None, status="")

    def batch_done(self, step: int, steps: int) -> None:
        self._start()
        self.progress.update(self.task, completed=step, total=steps)

    def epoch_done(self, record: dict) -> None:
        self._start()
        self.progress.console.print(
            f"{self.label} {record['epoch']}/{self.epochs}: train loss {record['train_loss']:.4f}, "
            f"val loss {record['val_loss']:.4f}, val accuracy {record['val_accuracy']:.3f}",
            highlight=False,
        )
        self.epoch = record["epoch"] + 1
        if self.epoch <= self.epochs:
            self.progress.update(self.task, description=f"{self.label} {self.epoch}/{self.epochs}", completed=0)
