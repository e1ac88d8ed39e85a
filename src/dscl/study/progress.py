"""The progress display of a study over its grid of cells."""

from __future__ import annotations

import sys
import threading

from dscl.study.spec import Cell


class Progress:
    """One progress display over the grid: tqdm on a terminal, plain lines otherwise.

    Safe to call from several job threads."""

    def __init__(self, total: int, done: int, label: str, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.label = total, done, label
        self.spent: list[float] = []
        self.running: list[str] = []
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
            eta = ""
            if self.spent:  # the grid's remaining cells (this one included) at the mean so far
                cells, mean = self.total - self.done, sum(self.spent) / len(self.spent)
                eta = (
                    f"; {cells} cell{'s' if cells != 1 else ''} left at {_duration(mean)} "
                    f"each: about {_duration(cells * mean / jobs)}"
                )
            position = self.done + len(self.running)
            self._print(f"[{position}/{self.total}] {cell.name}: running{note}{eta}")

    def finish(self, cell: Cell, seconds: float) -> None:
        with self._lock:
            self.spent.append(seconds)
            self.done += 1
            self.running.remove(cell.name)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(", ".join(self.running), refresh=True)
            else:
                self._print(f"[{self.done}/{self.total}] {cell.name}: done in {_duration(seconds)}")

    def skip(self, cell: Cell, why: str) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.write(f"study {self.label}: {cell.name}: {why}")
            else:
                self._print(f"{cell.name}: {why}")

    def abandon(self, cell: Cell) -> None:
        with self._lock:
            if cell.name in self.running:
                self.running.remove(cell.name)

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
