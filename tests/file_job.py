"""A streaming file job as its own process, for the kill-and-resume test.

python tests/file_job.py BASE_URL SOURCE OUTPUT CHECKPOINT BLOCK_ROWS
"""

from __future__ import annotations

import sys

from runflow_frames import run_batches_file

if __name__ == "__main__":
    base_url, source, output, checkpoint, block_rows = sys.argv[1:6]
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
