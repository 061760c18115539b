"""Rich progress for decoding images and training epochs, shared by ``autoft train``, ``search`` and ``pretrain``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator

from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

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


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} images/s" if task.speed else "", style="progress.data.speed")


class DecodeProgress:
    """Count, rate and ETA while images decode: a ``(done, total)`` callback for :func:`autoft.data.decoding.decode_and_split`.

    Nothing shows when the images come from the cache; the bar appears with the first
    decoded image and stops with the last, before any training display starts.
    """

    def __init__(self):
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]decoding images"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not console.is_terminal,  # a bar only where it can move
            )  # fmt: skip
            try:
                self.progress.start()
            except LiveError:  # another display is live (decoding inside a running search): stay quiet
                self.progress = Progress(console=console, disable=True)
            self.task = self.progress.add_task("decode", total=total)
        self.progress.update(self.task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@contextmanager
def decoding_progress() -> Iterator[None]:
    """Show decoding progress for whatever the block loads (``with decoding_progress(): train(...)``)."""
    from autoft.data.decoding import reporting_progress

    display = DecodeProgress()
    try:
        with reporting_progress(display):
            yield
    finally:
        display.close()
