"""The exactly-once guarantee under SIGKILL: a real job in a subprocess, against the emulator in
its own process, killed at random moments and resumed until it finishes."""

from __future__ import annotations

from pathlib import Path

import pytest

from .crash_harness import soak


@pytest.mark.slow
def test_sigkill_at_random_moments_never_duplicates_or_loses_a_row(tmp_path: Path) -> None:
    rows = 6000
    result = soak(
        tmp_path,
        rows=rows,
        kills=22,
        seed=20261129,
        latency=0.01,
        concurrency=8,
        max_delay=0.15,
        # Chunks of 2 rows and a segment every 40 answered rows: a run that lives 0.1 s goes
        # through several intent groups and segment writes, so kills land in those too.
        chunk_size=2,
        segment_rows=40,
    )
    # Enough kills landed inside the job (the rest of the delays fell after it ended).
    assert len(result.kill_delays) >= 20
    assert result.result is not None
    assert len(result.result) == rows
    assert result.result["runflow_run_id"].notna().all()
    # Kills left chunks whose answer was not recorded, and resumes re-sent them: the server
    # replayed those instead of creating them again.
    assert result.replays > 0
    # From the server's own accounting: every row created exactly once, none extra.
    assert result.duplicates == {}
    assert set(result.runs_by_ref) == set(result.result["runflow_client_ref"])
    # The final frame is the server's record of each row.
    assert result.mismatches() == []
