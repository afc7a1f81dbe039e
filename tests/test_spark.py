"""The README's Spark recipe (mapInPandas, a checkpoint per partition) on a local Spark."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest


def java_missing() -> str | None:
    """Why a Spark session cannot start here, or None: decided by running `java -version`.

    Spark needs a Java runtime (17 or newer), which pip cannot install: where there is none, the
    test skips and says so instead of failing with JAVA_GATEWAY_EXITED.
    """
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home, "bin", "java")) if home else shutil.which("java")
    if java is None:
        return "no `java` on PATH and JAVA_HOME unset"
    try:
        done = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{java} -version` failed: {exc}"
    if done.returncode != 0:
        return f"`{java} -version` exited {done.returncode}"
    found = re.search(r'version "(1\.)?(\d+)', done.stderr + done.stdout)
    if found is None or int(found.group(2)) < 17:
        return f"`{java} -version` does not show Java 17 or newer"
    return None


MISSING = java_missing()
if MISSING is not None:
    pytest.skip(
        f"the Spark recipe needs a Java runtime 17+ ({MISSING}); install one (e.g. "
        "`apt install openjdk-17-jre-headless`) or set JAVA_HOME to run it",
        allow_module_level=True,
    )
pyspark = pytest.importorskip("pyspark")

from pyspark import TaskContext  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

import runflow_frames  # noqa: E402
from runflow_frames.emulator import Emulator, serve  # noqa: E402

from .conftest import API_KEY  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        # PySpark 4.3 warns that it does not fully support pandas 3 yet.
        "ignore:PySpark does not yet fully support pandas:FutureWarning",
        "ignore::DeprecationWarning",
        "ignore::ResourceWarning",
    ),
]

SCHEMA = (
    "key string, prompt string, runflow_client_ref string, runflow_batch_id string, "
    "runflow_item_id string, runflow_run_id string, runflow_sequence_index long, "
    "runflow_status string, runflow_error string"
)


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers need this venv's packages
    # local[2, 2]: two cores, and a failed task is tried twice (as on a cluster).
    session = (
        SparkSession.builder.master("local[2, 2]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    yield session
    session.stop()


def recipe(root: Path, url: str, fail_first_try: bool) -> Any:
    def submit(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        pdf = pd.concat(list(batches)).set_index("key")
        context = TaskContext.get()
        out = runflow_frames.run_batches(
            pdf,
            "acme",
            "echo",
            checkpoint=root / f"partition-{context.partitionId():06d}",
            max_concurrency=4,
            api_key=API_KEY,
            base_url=url,
        )
        if fail_first_try and context.partitionId() == 0 and context.attemptNumber() == 0:
            (root / "failed-once").touch()
            raise RuntimeError("the executor dies after submitting, before Spark has the rows")
        yield out.reset_index()

    return submit


def test_the_spark_recipe_submits_each_row_once_even_when_a_task_is_retried(
    spark: Any, tmp_path: Path
) -> None:
    emulator = Emulator()
    pdf = pd.DataFrame({"key": [f"r{i:04d}" for i in range(1000)], "prompt": ["p"] * 1000})
    sdf = spark.createDataFrame(pdf).repartition(4)
    with serve(emulator) as url:
        out = sdf.mapInPandas(recipe(tmp_path, url, True), schema=SCHEMA).toPandas()
        again = sdf.mapInPandas(recipe(tmp_path, url, False), schema=SCHEMA).toPandas()
    assert (tmp_path / "failed-once").exists()  # partition 0 did run twice
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(pdf["key"], 1)
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert dict(zip(out["key"], out["runflow_run_id"], strict=True)) == received
    # The second job resumed every partition from its checkpoint: nothing new was created.
    assert dict(zip(again["key"], again["runflow_run_id"], strict=True)) == received
    assert seen.batches_created == out["runflow_batch_id"].nunique()
    assert seen.idempotent_replays == 0  # the retried task found its handles on disk
