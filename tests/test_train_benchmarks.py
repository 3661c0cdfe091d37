"""The training benchmark scripts run (GPU script in its --smoke mode on CPU, with Ray and MLflow
made unimportable, as on a machine that has only torch, timm and open_clip)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_without_ray_or_mlflow():
    # the uint8 feed is the one a GPU gets; --feed uint8 runs it here on CPU
    blocked = "".join(f"sys.modules[{m!r}] = None; " for m in ("ray", "mlflow", "prefect", "duckdb", "pydantic"))
    code = (f"import runpy, sys; {blocked}"
            f"sys.argv = ['train_gpu.py', '--smoke', '--feed', 'uint8']; runpy.run_path({str(ROOT / 'benchmarks' / 'train_gpu.py')!r}, "
            "run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("device: CPU")
    assert any(line.startswith("feed: uint8 pixels") for line in lines), lines
    assert re.fullmatch(r"parquet_samples_per_s: [0-9.]+", lines[-1]), lines
    assert float(lines[-1].split(": ")[1]) > 0
