"""Measuring a stage: wall time and peak resident memory of this process."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Stage:
    """Context manager that records wall seconds and peak RSS (sampled) of this process."""

    name: str
    interval: float = 0.05
    seconds: float = 0.0
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)

    def __enter__(self) -> "Stage":
        self.peak_rss = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)
