"""Progress reporting: a tqdm.auto bar (a widget in notebooks, a bar in terminals), a callback,
or nothing.

``progress=None`` (the default) shows a bar only where someone can see it: a terminal on stderr,
or a notebook. ``True`` forces the bar, ``False`` silences it, and a callable is called as
``progress(done, total)`` in rows, each time the count moves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

ProgressOption = bool | Callable[[int, int], None] | None


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


class Reporter:
    """Counts rows done out of ``total`` and reports them as ``progress`` asks."""

    def __init__(
        self, progress: ProgressOption, *, total: int, desc: str, initial: int = 0
    ) -> None:
        self.total = total
        self.done = initial  # done before this run (a resumed job): counted, not timed
        self._callback = progress if callable(progress) else None
        self._bar: Any = None
        show = progress is True or (progress is None and (_in_notebook() or sys.stderr.isatty()))
        if show and self._callback is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total or None,
                initial=initial,
                desc=desc,
                unit="row",
                unit_scale=True,
                dynamic_ncols=True,
            )

    def advance(self, rows: int) -> None:
        if rows <= 0:
            return
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def note(self, **fields: str) -> None:
        """Shown beside the count (the bar's postfix): money spent, a budget."""
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)

    def part(self) -> Callable[[int, int], None]:
        """A ``progress`` callback for a part of this job (a block, a block's collect) that
        starts now: its ``(done, total)`` moves this one's count on from here."""
        start = self.done

        def advance(done: int, _total: int) -> None:
            self.advance(start + done - self.done)

        return advance

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
