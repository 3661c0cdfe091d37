"""The curate stage under a DuckDB memory limit far below what its tables need: it spills to the
configured temp directory and builds the same snapshot as an unconstrained run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from clipline.components.catalog import Catalog
from clipline.components.config import load_config
from clipline.components.curate import CurateError, curate, synthetic

N_ROWS = 200_000


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return synthetic.generate(raw, N_ROWS, 50_000)


def _data_dir(base: Path, shards) -> Path:
    base.mkdir(parents=True)
    with Catalog(base / "catalog.duckdb") as cat:
        for sid, path, table in shards:
            cat.record_raw_shard(sid, path, table, {"synthetic": True})
    return base


class _TempWatch:
    """Polls a directory while a run is under way; remembers the most bytes of files seen in it."""

    def __init__(self, path: Path):
        self.path, self.max_bytes, self._stop = path, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for f in list(self.path.glob("**/*")):
                try:
                    total += f.stat().st_size if f.is_file() else 0
                except FileNotFoundError:
                    pass  # DuckDB removed it between listing and stat
            self.max_bytes = max(self.max_bytes, total)
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _cfg(data: Path, limit: str):
    return load_config(
        None,
        {
            "data_dir": data,
            "curate": {
                "duckdb_memory_limit": limit,
                "duckdb_temp_dir": data / "spill",
                "duckdb_threads": 2,
                "contact_sheet_examples": 0,
            },
        },
    )


@pytest.mark.slow
def test_spills_under_a_small_memory_limit_and_builds_the_same_snapshot(tmp_path, shards):
    free = curate(_cfg(_data_dir(tmp_path / "free", shards), "4GB"), track=False)
    assert free.manifest["duckdb_spilled_bytes_max"] == 0  # it all fit: nothing was spilled

    tight_dir = _data_dir(tmp_path / "tight", shards)
    cfg = _cfg(tight_dir, "96MB")  # DuckDB's buffer manager gets 72 MB of it (db.DUCKDB_SHARE)
    (tight_dir / "spill").mkdir()
    with _TempWatch(tight_dir / "spill") as watch:
        tight = curate(cfg, track=False)
    # DuckDB held tens of MB of data in the temp dir, as seen from outside...
    assert watch.max_bytes > 16 * 2**20
    # ...and as DuckDB reported it
    assert tight.manifest["duckdb_spilled_bytes_max"] > 16 * 2**20
    assert tight.snapshot_id == free.snapshot_id and tight.counts == free.counts
    assert tight.n_rows == free.n_rows == free.counts["kept"] and free.counts["input"] == N_ROWS
    manifest = json.loads((tight.path / "manifest.json").read_text())
    assert manifest["config"]["duckdb_memory_limit"] == "96MB"


def test_a_limit_too_small_to_work_in_says_which_setting_to_raise(tmp_path, shards):
    cfg = _cfg(_data_dir(tmp_path / "tiny", shards), "8MB")
    with pytest.raises(CurateError, match=r"duckdb_memory_limit = 8MB.*raise duckdb_memory_limit"):
        curate(cfg, track=False)
