"""A progress bar (tqdm) with rows/s and ETA, on a terminal only: quiet in pipelines and logs."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int | None, enabled: bool | None = None, stream=None,
                 description: str = "scoring"):
        stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=" rows", unit_scale=True, dynamic_ncols=True,
                             smoothing=0.05, file=stream, desc=description)

    def advance(self, rows: int) -> None:
        if self._bar is not None:
            self._bar.update(rows)

    def estimate_total(self, total: int | None) -> None:
        """For files that only reading measures (CSV, JSON Lines): a better guess at rows."""
        if self._bar is not None and total and total != self._bar.total:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
