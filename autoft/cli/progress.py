"""Rich progress for training epochs, shared by ``autoft train`` and ``autoft search``."""

from __future__ import annotations

from abc import ABC, abstractmethod

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autoft.cli.common import console


class LazyProgress(ABC):
    """A Rich progress display that appears on its first update, so that errors raised while
    loading data print cleanly. Subclasses add their tasks in ``_add_tasks``."""

    def __init__(self):
        self.started = False
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.progress.__exit__(*exc)

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.progress.__enter__()
            self._add_tasks()

    @abstractmethod
    def _add_tasks(self) -> None:
        """Add this display's tasks to ``self.progress``."""


class EpochProgress(LazyProgress):
    """A bar per epoch's batches, and a line per finished epoch with loss and accuracy."""

    def __init__(self, epochs: int, label: str = "epoch"):
        super().__init__()
        self.epochs = epochs
        self.label = label
        self.task = None
        self.epoch = 1

    def _add_tasks(self) -> None:
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
