"""The notebooks run, top to bottom, against the emulator: they cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(Path(__file__).parents[1].joinpath("notebooks").glob("*.ipynb"))


@pytest.fixture(autouse=True)
def _jupyter_dirs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Jupyter, IPython and matplotlib keep their files under $HOME by default: point them at a
    # temporary directory, so the notebooks run where the home directory is not writable (a CI
    # image, a locked-down account) and never read the developer's own configuration.
    for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "jupyter" / name.lower()))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))


def test_there_are_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "big_files.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_is_committed_without_outputs(path: Path, tmp_path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code")
    NotebookClient(
        book, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in book.cells for o in cell.get("outputs", [])]
    assert [o for o in outputs if o.get("output_type") == "error"] == []
    # What a reader sees: a widget progress bar, and the book's own results (checked here, so
    # the notebooks stay tutorials, with no assertions in them).
    shown = "\n".join(_text(o) for o in outputs)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    for expected in EXPECTED[path.stem]:
        assert expected in shown, expected
    if path.stem == "quickstart":
        assert any("image/png" in o.get("data", {}) for o in outputs)  # the chart is drawn


EXPECTED = {
    "quickstart": [
        "succeeded                        888",  # the summary
        "collected        1,000 of 1,000 rows: 888 succeeded, 112 failed",  # status, from a shell
        "2                succeeded         112",  # the retried rows, attempt 2
        "2    112",  # runs per row on the server: the retried ones twice, the others once
        "CAPTION 1CAPTION 1",
    ],
    "big_files": [
        "refused      none: every row would be sent",
        "'blocks_skipped': 0",
        "200,000 rows, 200,000 runs",
        "'blocks_skipped': 4",
        "submitted        200,000 rows of 200,000 (100%) in 2,000 chunks",
    ],
}


def _text(output: dict[str, object]) -> str:
    if output.get("output_type") == "stream":
        return str(output.get("text", ""))
    data = output.get("data", {})
    return str(data.get("text/plain", "")) if isinstance(data, dict) else ""
