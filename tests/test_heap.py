"""Kept outcomes leave the cyclic collector's full passes while a collect runs, and only then
(``_heap``): what the process froze itself stays as it was, and nothing stays frozen after."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pandas as pd
import pytest

from runflow_frames import collect, run_batches
from runflow_frames._heap import keeping, settle

from .conftest import API_KEY


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def test_kept_objects_are_frozen_while_collecting_and_handed_back_after() -> None:
    with keeping():
        kept = [{"output": {"n": n}} for n in range(1000)]
        settle()
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0


def test_the_last_of_two_collects_hands_them_back() -> None:
    with keeping():
        with keeping():
            settle()
        assert gc.get_freeze_count() > 0, "the other collect still runs"
        settle()
    assert gc.get_freeze_count() == 0


def test_what_the_process_froze_itself_is_left_alone() -> None:
    gc.freeze()
    before = gc.get_freeze_count()
    # Frozen objects can still be freed (by reference counting): the count may fall, never rise.
    with keeping():
        kept = [{"n": n} for n in range(1000)]
        settle()
        assert gc.get_freeze_count() <= before, "our objects went in with the process's"
    assert 0 < gc.get_freeze_count() <= before, "the process's own frozen objects were thawed"
    assert len(kept) == 1000


def test_nothing_is_frozen_when_the_collector_is_off() -> None:
    gc.disable()
    with keeping():
        settle()
        assert gc.get_freeze_count() == 0


def test_a_collect_freezes_as_outcomes_arrive_and_leaves_nothing_frozen(base_url: str) -> None:
    df = pd.DataFrame({"text": [f"t{i}" for i in range(300)]}, index=[f"r{i}" for i in range(300)])
    sent = run_batches(df, "acme/echo", chunk_size=100, api_key=API_KEY, base_url=base_url)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # the collect runs on this thread's event loop; watch from another
        while not stop.is_set():
            seen.append(gc.get_freeze_count())
            stop.wait(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = collect(sent, api_key=API_KEY, base_url=base_url, poll_interval=(0.05, 0.05))
    finally:
        stop.set()
        watcher.join()
    assert (out["runflow_status"] == "succeeded").all()
    assert max(seen) > 0, "outcomes were never moved out of the full passes"
    assert gc.get_freeze_count() == 0
