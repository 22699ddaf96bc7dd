"""One progress line for a whole run, drawn by the launcher only."""

from __future__ import annotations

import sys


class ProgressLine:
    def __init__(self, total: int, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._drawn = False

    def update(self, done: int, label: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / self.total) if self.total else width
        self._draw(f"[{'#' * filled}{'.' * (width - filled)}] {label}")

    def note(self, label: str) -> None:
        if self.enabled:
            self._draw(label)

    def _draw(self, text: str) -> None:
        self.stream.write(f"\r\033[K{text}")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
