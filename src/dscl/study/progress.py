"""The progress display of a study over its grid of cells."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Hashable, Iterable

from dscl.study.spec import Cell


class Progress:
    """One progress display over the grid: tqdm on a terminal, plain lines otherwise.

    Safe to call from several job threads. With ``setting`` (a cell's setting without the
    seed), the estimate of the cells left (``todo``, less those finished or skipped since) takes
    each at the mean wall time of its setting's finished cells, those of earlier sessions
    (``known``: cell and wall seconds) included, or of all finished cells for a setting with
    none; without, every cell left at the mean of the cells this display saw finish."""

    def __init__(
        self,
        total: int,
        done: int,
        label: str,
        stream=None,
        *,
        todo: Iterable[Cell] = (),
        known: Iterable[tuple[Cell, float]] = (),
        setting: Callable[[Cell], Hashable] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.label = total, done, label
        self.spent: list[float] = []
        self.running: list[str] = []
        self.setting = setting
        self.left = {cell.name: cell for cell in todo}
        self.walls: dict[Hashable, list[float]] = {}  # wall seconds by setting
        for cell, seconds in known:
            self._record(cell, seconds)
        self.bar = None
        self._lock = threading.Lock()
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, desc=label, unit="cell", file=self.stream, leave=True
            )

    def start(self, cell: Cell, note: str = "", jobs: int = 1) -> None:
        with self._lock:
            self.running.append(cell.name)
            if self.bar is not None:
                self.bar.set_postfix_str(", ".join(self.running), refresh=True)
                return
            eta = self._estimate(jobs)
            position = self.done + len(self.running)
            self._print(f"[{position}/{self.total}] {cell.name}: running{note}{eta}")

    def finish(self, cell: Cell, seconds: float) -> None:
        with self._lock:
            self.spent.append(seconds)
            self._record(cell, seconds)
            self.left.pop(cell.name, None)
            self.done += 1
            self.running.remove(cell.name)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(", ".join(self.running), refresh=True)
            else:
                self._print(f"[{self.done}/{self.total}] {cell.name}: done in {_duration(seconds)}")

    def finished_elsewhere(self, cell: Cell) -> None:
        """``cell`` was finished by another process after this one listed it."""
        with self._lock:
            self.left.pop(cell.name, None)
            self.done += 1

    def skip(self, cell: Cell, why: str) -> None:
        with self._lock:
            self.left.pop(cell.name, None)
            if self.bar is not None:
                self.bar.write(f"study {self.label}: {cell.name}: {why}")
            else:
                self._print(f"{cell.name}: {why}")

    def abandon(self, cell: Cell) -> None:
        with self._lock:
            self.left.pop(cell.name, None)
            if cell.name in self.running:
                self.running.remove(cell.name)

    def _record(self, cell: Cell, seconds: float) -> None:
        if self.setting is not None:
            self.walls.setdefault(self.setting(cell), []).append(seconds)

    def _estimate(self, jobs: int) -> str:
        """The estimate's text, "; N cells left ...: about T" (the starting cell included), or
        "" with nothing measured yet."""
        if self.setting is not None and self.walls and self.left:
            every = [s for walls in self.walls.values() for s in walls]
            overall = sum(every) / len(every)

            def expected(cell: Cell) -> float:
                walls = self.walls.get(self.setting(cell))
                return sum(walls) / len(walls) if walls else overall

            cells, seconds = len(self.left), sum(map(expected, self.left.values()))
            return (
                f"; {cells} cell{'s' if cells != 1 else ''} left, each at its setting's mean "
                f"wall time so far: about {_duration(seconds / jobs)}"
            )
        if self.spent:  # the grid's remaining cells (this one included) at the mean so far
            cells, mean = self.total - self.done, sum(self.spent) / len(self.spent)
            return (
                f"; {cells} cell{'s' if cells != 1 else ''} left at {_duration(mean)} "
                f"each: about {_duration(cells * mean / jobs)}"
            )
        return ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _print(self, text: str) -> None:
        print(f"study {self.label}: {text}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
