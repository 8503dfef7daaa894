"""Time the stages of a long job (an export) and say each one as it ends.

clock = StageClock(say=print)
with clock("capture"):
    ...
clock.seconds   # {"capture": 18.7, ...}, in order
clock.summary() # "capture 18.7 s, ... (total 25.3 s)"
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class StageClock:
    """Wall-clock seconds per named stage; ``say`` (optional) gets one line as each stage ends."""

    def __init__(self, say: Callable[[str], None] | None = None, prefix: str = "") -> None:
        self.say, self.prefix = say, prefix
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        took = time.perf_counter() - began
        self.seconds[stage] = self.seconds.get(stage, 0.0) + took
        if self.say is not None:
            self.say(f"{self.prefix}{stage}: {took:.1f} s")

    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> str:
        """One line: each stage's seconds and the total."""
        parts = ", ".join(f"{stage} {s:.1f} s" for stage, s in self.seconds.items())
        return f"{parts} (total {self.total():.1f} s)"
