"""A streaming file job as its own process, for the kill-and-resume test.

python tests/file_job.py BASE_URL SOURCE OUTPUT CHECKPOINT BLOCK_ROWS [LEASE_SECONDS]

LEASE_SECONDS shortens an object-storage checkpoint's lease, so that the run after a kill need
not wait for the killed run's lease to expire.
"""

from __future__ import annotations

import sys

from runflow_frames import _objectstore, run_batches_file

if __name__ == "__main__":
    base_url, source, output, checkpoint, block_rows = sys.argv[1:6]
    if len(sys.argv) > 6:
        _objectstore.LEASE_SECONDS = float(sys.argv[6])
    print("READY", flush=True)
    counts = run_batches_file(
        source,
        "acme",
        "echo",
        output=output,
        checkpoint=checkpoint,
        key="id",
        block_rows=int(block_rows),
        base_url=base_url,
        progress=False,
    )
    print("DONE", counts, flush=True)
