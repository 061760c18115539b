"""A search's time, as one value: :class:`Budget`.

There is one clock, ``time.monotonic()``. On Linux, macOS and Windows it is system-wide, so
a budget pickled into a ``--jobs`` worker process on the same machine ends at the same
instant there. A budget is frozen: a stage gets a budget of its own (:meth:`Budget.stage`),
time kept back for later work is named (:meth:`Budget.reserve`), and nothing rewrites a
deadline while the work runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Budget:
    """Time from ``start`` until ``end`` (``time.monotonic()`` values; ``end=None``: unbounded).

    ``hard_end`` is the end of the whole command (None: none), which a stage's budget may not
    pass: a stage that must leave something (a pretraining checkpoint) may finish its first step
    after its own ``end``, never after ``hard_end``. ``reserved`` names the time kept back.
    """

    end: float | None = None
    start: float = field(default_factory=time.monotonic)
    hard_end: float | None = None
    reserved: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, seconds: float | None, start: float | None = None) -> Budget:
        """``seconds`` from ``start`` (now by default); None: no limit."""
        start = time.monotonic() if start is None else start
        end = None if seconds is None else start + seconds
        return cls(end=end, start=start, hard_end=end)

    @property
    def bounded(self) -> bool:
        return self.end is not None

    @property
    def seconds(self) -> float | None:
        """The whole length, reserves included; None when unbounded."""
        return None if self.end is None else self.end - self.start + sum(s for _, s in self.reserved)

    @property
    def deadline(self) -> float | None:
        """When the work must stop (``time.monotonic()``), for loops that poll the clock."""
        return self.end

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def reserve(self, name: str, seconds: float) -> Budget:
        """This budget, ending ``seconds`` earlier: what is left once ``name`` has its time."""
        if self.end is None:
            return self
        return replace(self, end=self.end - max(0.0, seconds), reserved=(*self.reserved, (name, max(0.0, seconds))))

    def extended(self, seconds: float) -> Budget:
        """This budget with ``seconds`` of slack past its end (a refit that is all that is left)."""
        if self.end is None:
            return self
        end = self.end + max(0.0, seconds)
        return replace(self, end=end, hard_end=end if self.hard_end is None else max(end, self.hard_end))

    def stage(self, seconds: float | None) -> Budget:
        """A stage starting now that may take ``seconds`` (None: what is left), within this budget."""
        now = time.monotonic()
        ends = [e for e in (self.end, None if seconds is None else now + seconds) if e is not None]
        return Budget(end=min(ends) if ends else None, start=now, hard_end=self.hard_end)

    def hard_expired(self) -> bool:
        return self.hard_end is not None and time.monotonic() > self.hard_end


UNBOUNDED = Budget()
