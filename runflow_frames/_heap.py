"""Kept outcomes and the cyclic garbage collector.

A collect keeps every row's outcome to the end: for a million rows, a million output dicts.
CPython's cyclic collector makes a full pass over every tracked object each time the objects that
survived grow by a quarter, so while outcomes pile up it re-scans all of them (and everything
imported) again and again: measured on 100,000 rows, six full passes took 0.7 s of a 2.8 s
collect. Outcomes are JSON trees, which hold no cycle, and they live as long as the result: the
passes can find nothing in them.

So while a collect is under way (``keeping``), each batch's outcomes are moved out of those
passes when they are kept (``settle``: ``gc.freeze``, O(1)), and handed back when the last
collect in the process ends (``gc.unfreeze``). Reference counting still frees everything that
is not a cycle; a cycle that became garbage in the meantime is collected after. Nothing is
frozen when the process had frozen objects of its own, or the collector is disabled.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_open = 0  # collects under way in this process
_ours = False  # whether the permanent generation is ours to freeze into and hand back


@contextmanager
def keeping() -> Iterator[None]:
    """A collect under way: ``settle`` freezes until the last one in the process ends."""
    global _open, _ours
    with _lock:
        if _open == 0:
            _ours = gc.isenabled() and gc.get_freeze_count() == 0
        _open += 1
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0 and _ours:
                _ours = False
                gc.unfreeze()


def settle() -> None:
    """Objects kept so far leave the collector's full passes (inside ``keeping`` only)."""
    if _ours:
        gc.freeze()
