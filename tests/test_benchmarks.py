"""Every script in benchmarks/ runs at a tiny size, as a user runs it (`python benchmarks/X.py ...`, its own
process), and ends with its headline `name: number`, the number positive.

The scripts run where only what `pip install -e '.[bench]'` installs can be imported: a package in this
environment that neither the core dependencies nor the `bench` extra bring in (pytest, ruff, ...) is
hidden from them, so a benchmark that needs an undeclared package fails here as it would in a fresh
install, even though this environment has it (issue 17: `train_throughput.py` and `eval_throughput.py`
ran only where the test extra happened to bring webdataset and clip-benchmark).

curate_scaling.py and ingest_memory.py have their smoke tests beside their own tests.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HEADLINE = re.compile(r"([a-z0-9_]+): ([0-9]+(?:\.[0-9]+)?)")


# ------------------------------------------------------------------ what a fresh install has
def declared_distributions(extras: tuple[str, ...] = ("bench",)) -> set[str]:
    """Installed distributions that `pip install -e '.[EXTRAS]'` brings in: clipline's requirements in
    pyproject.toml (the source of truth, not the installed metadata, which may be older) and theirs,
    transitively, with markers and extras evaluated."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def own(wanted) -> list[str]:
        return [*project["dependencies"], *(r for e in wanted for r in project["optional-dependencies"].get(e, []))]

    found: set[str] = set()
    done: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in own(extras)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == "clipline":  # "clipline[bench]" inside another extra
            todo += [Requirement(r) for r in own(req.extras)]
            continue
        if (name, frozenset(req.extras)) in done:
            continue
        done.add((name, frozenset(req.extras)))
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # not installed: nothing here to hide either
        found.add(name)
        envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
        for spec in dist.requires or []:
            r = Requirement(spec)
            if r.marker is None or any(r.marker.evaluate(e) for e in envs):
                todo.append(r)
    return found


@functools.cache
def _installed_modules() -> dict[str, list[str]]:
    return packages_distributions()  # reads every installed distribution's file list: once


def undeclared_modules(extras: tuple[str, ...] = ("bench",)) -> set[str]:
    """Top-level modules installed here that only undeclared distributions provide."""
    keep = declared_distributions(extras) | {"clipline", "pip"}  # pip: every venv has it
    return {mod for mod, dists in _installed_modules().items() if not any(canonicalize_name(d) in keep for d in dists)}


SITECUSTOMIZE = '''"""Written by tests/test_benchmarks.py: hides modules a fresh install would not have."""
import sys

_HIDDEN = frozenset({hidden!r})


class _Hidden:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by tests/test_benchmarks.py: "
                                      "{why})", name=name)
        return None


sys.meta_path.insert(0, _Hidden)
'''


def env_hiding(directory: Path, hidden: set[str], why: str, **extra: str) -> dict[str, str]:
    """os.environ plus a sitecustomize (in ``directory``) that makes ``hidden`` unimportable in the
    process and its children."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=sorted(hidden), why=why))
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH")) if p)
    # one torch thread: on a busy 2-core machine two OpenMP threads spinning against each other make a
    # tiny training step take seconds instead of a fraction of one (these runs check, not measure)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="session")
def fresh_hidden() -> set[str]:
    return undeclared_modules()


@pytest.fixture
def bench_env(tmp_path, fresh_hidden):
    return env_hiding(
        tmp_path / "site",
        fresh_hidden,
        "not declared by clipline[bench]",
        CLIPLINE_BENCH_CACHE=str(tmp_path / "bench-cache"),
    )


def run_bench(script: str, args: list[str], env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, f"{script} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def headline(out: subprocess.CompletedProcess, name: str) -> float:
    """The last line is `name: number` with a positive number."""
    last = out.stdout.strip().splitlines()[-1]
    m = HEADLINE.fullmatch(last)
    assert m and m[1] == name, f"last line {last!r} is not `{name}: number`"
    assert float(m[2]) > 0, last
    return float(m[2])


# ------------------------------------------------------------------------ the hiding itself
def test_a_fresh_install_without_the_bench_extra_lacks_what_the_benchmarks_import():
    """The check above has teeth: without the extra, the modules of issue 17 are hidden; with it, not."""
    core_only = undeclared_modules(extras=())
    assert {"webdataset", "clip_benchmark"} <= core_only
    with_bench = undeclared_modules()
    assert not {"webdataset", "braceexpand", "pandas", "clip_benchmark", "open_clip_train"} & with_bench
    assert "pytest" in with_bench  # test-only packages stay hidden


# ------------------------------------------------------------------------------- the scripts
@pytest.mark.slow
def test_train_throughput(bench_env, tmp_path):
    out = run_bench(
        "train_throughput.py",
        [
            "--model",
            "clipline-nano",
            "--batch-size",
            "8",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--images",
            "32",
            "--image-px",
            "64",
            "--loader-workers",
            "0",
            "--threads",
            "1",
        ],
        bench_env,
        tmp_path,
    )
    assert re.search(r"^open_clip_train: 3 steps", out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^clipline_samples_per_s: [0-9.]+$", out.stdout, re.MULTILINE), out.stdout
    headline(out, "ratio")


@pytest.mark.slow
def test_eval_throughput(bench_env, tmp_path):
    out = run_bench(
        "eval_throughput.py",
        ["--images", "8", "--classes", "2", "--templates", "1", "--batch-size", "8", "--repeats", "1"],
        bench_env,
        tmp_path,
    )
    assert re.search(r"^clip_benchmark: [0-9.]+ images/s", out.stdout, re.MULTILINE), out.stdout
    headline(out, "ratio")


def test_clip_score_throughput(bench_env, tmp_path):
    out = run_bench(
        "clip_score_throughput.py", ["--rows", "16", "--batch-size", "8", "--repeats", "1"], bench_env, tmp_path
    )
    assert re.search(r"^plain_open_clip_loop: [0-9.]+ pairs/s", out.stdout, re.MULTILINE), out.stdout
    headline(out, "ratio")


def on_test_server(env: dict) -> dict:
    """``env`` for a benchmark that runs the pipeline on a toy web: the session's Prefect test server
    as the API, so that its flows do not each start a temporary server (10-20 s apiece), and download
    deadlines of 2 / 3 s instead of the demo's 4 / 8 s, so that the toy web's hanging URLs (its
    'timeout' fault) hold each ingest 3 s, not 8 (the figures of a smoke run mean nothing anyway)."""
    from prefect.settings import get_current_settings

    return {
        **env,
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "CLIPLINE_INGEST__READ_TIMEOUT": "2",
        "CLIPLINE_INGEST__TOTAL_TIMEOUT": "3",
    }


@pytest.mark.slow
def test_clip_filter(bench_env, tmp_path, prefect_harness):
    """The whole loop at a tiny size (an untrained champion: the shares mean nothing, the lines must be there)."""
    out = run_bench("clip_filter.py", ["--n", "200", "--steps", "5"], on_test_server(bench_env), tmp_path, timeout=600)
    for name in ("mismatched_dropped", "matched_kept", "heldout_acc1_unfiltered"):
        assert re.search(rf"^{name}: [0-9.]+$", out.stdout, re.MULTILINE), out.stdout
    assert re.fullmatch(r"heldout_acc1_filtered: [0-9.]+", out.stdout.strip().splitlines()[-1]), out.stdout
    assert re.search(r"^\| 0.7 \| [0-9.]+ of [0-9]+ \| [0-9.]+ of [0-9]+ \| 0 / [0-9]+ \|$", out.stdout, re.MULTILINE)


@pytest.mark.slow
def test_object_store_feed(bench_env, tmp_path):
    """Tiny, torch feed only (the Ray feed's start-up costs a minute): both sources run and the ratio is
    printed last."""
    out = run_bench(
        "object_store_feed.py",
        ["--n", "96", "--image-px", "64", "--model", "clipline-nano", "--batch-size", "16", "--steps", "3"]
        + ["--feed", "torch"],
        bench_env,
        tmp_path,
    )
    assert re.search(r"^torch feed, local \(\w+\): [0-9.]+ samples/s", out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^torch feed, store \(s3://bench/snapshots/\w+\): [0-9.]+ samples/s", out.stdout, re.MULTILINE)
    assert re.search(r"^ratio_torch: [0-9.]+$", out.stdout, re.MULTILINE), out.stdout
    headline(out, "ratio")


def test_imaging_speed(bench_env, tmp_path):
    headline(run_bench("imaging_speed.py", ["--n", "4", "--repeats", "1"], bench_env, tmp_path), "ms_per_image")


def test_imaging_vs_cv2_without_opencv_times_clipline_and_says_why(bench_env, tmp_path):
    """No --images: it draws its own (the ingest benchmark's pictures); no OpenCV interpreter (no
    img2dataset venv in the cache): the OpenCV side is skipped with a message, clipline's still runs."""
    out = run_bench("imaging_vs_cv2.py", ["--n", "4", "--repeats", "1", "--rounds", "1"], bench_env, tmp_path)
    assert "OpenCV side skipped" in out.stdout and "--cv2-python" in out.stdout, out.stdout
    assert "images: 4," in out.stdout, out.stdout
    headline(out, "clipline_ms_per_image")


def test_imaging_vs_cv2_stops_when_the_given_interpreter_has_no_opencv(bench_env, tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "imaging_vs_cv2.py"), "--n", "2", "--cv2-python", sys.executable],
        capture_output=True,
        text=True,
        env=bench_env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert out.returncode != 0
    assert f"{sys.executable} cannot import cv2" in out.stderr, out.stderr


def test_fetch_throughput(bench_env, tmp_path):
    out = run_bench("fetch_throughput.py", ["--n", "300", "--concurrency", "16"], bench_env, tmp_path)
    assert "downloaded: 300/300" in out.stdout, out.stdout
    headline(out, "images_per_cpu_second")


def test_ingest_vs_img2dataset_clipline_side(bench_env, tmp_path):
    out = run_bench("ingest_vs_img2dataset.py", ["--n", "12", "--skip-img2dataset"], bench_env, tmp_path)
    assert "clipline: 12/12 ok" in out.stdout, out.stdout
    headline(out, "clipline_images_per_s")
    # the images are cached where imaging_vs_cv2.py's docstring says
    assert len(list((tmp_path / "bench-cache" / "images40kb-12").glob("*.jpg"))) == 12


@pytest.mark.slow
def test_train_gpu_smoke_runs_without_ray_or_mlflow(tmp_path, fresh_hidden):
    """--smoke on CPU, with the uint8 feed a GPU gets; Ray, MLflow, Prefect, DuckDB and pydantic hidden, as
    on a machine that has only torch, timm and open_clip."""
    env = env_hiding(
        tmp_path / "site",
        fresh_hidden | {"ray", "mlflow", "prefect", "duckdb", "pydantic"},
        "train_gpu.py needs only torch, timm and open_clip",
    )
    out = run_bench("train_gpu.py", ["--smoke", "--feed", "uint8"], env, tmp_path)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("device: CPU")
    assert any(line.startswith("feed: uint8 pixels") for line in lines), lines
    headline(out, "parquet_samples_per_s")


@pytest.mark.slow
def test_demo_time_with_a_generic_architecture_runs_both_demos(bench_env, tmp_path, prefect_harness):
    """--generic at a tiny size (100 URLs, 3 steps: the figures mean nothing, the lines must be there)."""
    env = {**on_test_server(bench_env), "CLIPLINE_TRAIN__STEPS": "3", "CLIPLINE_TRAIN__BATCH_SIZE": "16"}
    out = run_bench("demo_time.py", ["--n", "100", "--seed", "4", "--generic"], env, tmp_path, timeout=900)
    for line in ("--- seed 4 (", "--- seed 4, generic model clipline-rgb-cnn (", "generic_model: clipline-rgb-cnn"):
        assert line in out.stdout, out.stdout
    for name in ("generic_heldout_acc1_seed4", "generic_seen_acc1", "generic_heldout_acc1", "heldout_acc1_seed4"):
        assert re.search(rf"^{name}: [0-9.]+", out.stdout, re.MULTILINE), (name, out.stdout)
    assert re.fullmatch(r"heldout_acc1: [0-9.]+", out.stdout.strip().splitlines()[-1])
    assert "training: clipline-rgb-cnn, 3 steps" in out.stdout and "training: clipline-demo, 3 steps" in out.stdout


def test_demo_time_reports_a_demo_summary(bench_env, tmp_path):
    """The demo itself runs in tests/test_demo_cli.py (minutes); here the benchmark's report of a summary
    the demo wrote (`--summary`), in the demo's format, and its --help."""
    assert "--summary" in run_bench("demo_time.py", ["--help"], bench_env, tmp_path).stdout
    summary = {
        "seconds": 274.3,
        "skipped": None,
        "chance_acc1": 1 / 48,
        "heldout_acc1": 0.787,
        "seen_acc1": 0.919,
        "metrics": {"retrieval/val/image_to_text_R5": 0.97, "retrieval/val/text_to_image_R5": 0.91},
        "rows": [["URLs fetched", "2,996"], ["rows kept", "2,950"]],
        "train_recipe": {"steps": 700},
        "toy_web": "http://127.0.0.1:1",
        "n_urls": 3000,
        "n_fetched": 2996,
        "train": {"model": "clipline-demo", "steps": 700, "seconds": 184.0, "samples_per_s": 243.0},
        "model_version": {"name": "clipline", "version": "1", "alias": "champion"},
    }
    path = tmp_path / "demo_summary.json"
    path.write_text(json.dumps(summary))
    out = run_bench("demo_time.py", ["--summary", str(path)], bench_env, tmp_path)
    assert out.stdout.strip().splitlines()[-2] == "demo_seconds: 274.3", out.stdout
    assert "seen_acc1: 0.919" in out.stdout and "URLs fetched: 2,996" in out.stdout, out.stdout
    assert headline(out, "heldout_acc1") == 0.787

    # a rerun's summary (nothing new, no evaluation) has no figure to report: said, not a traceback
    path.write_text(
        json.dumps({**summary, "skipped": "nothing new", "heldout_acc1": None, "seen_acc1": None, "train": None})
    )
    out = subprocess.run(
        [sys.executable, str(BENCH / "demo_time.py"), "--summary", str(path)],
        capture_output=True,
        text=True,
        env=bench_env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0 and "nothing new" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
def test_recipe_ablation(bench_env, tmp_path, prefect_harness):
    """Two variants on one toy web at a tiny size (3 steps: the figures mean nothing, the lines must be there);
    the second changes a [train] value and one of the model's config (its temperature's start)."""
    out = run_bench(
        "recipe_ablation.py",
        [
            "--n",
            "150",
            "--steps",
            "3",
            "--model",
            "clipline-tiny",
            "--variant",
            "recipe",
            "--set",
            "small_batch:batch_size=16,model.init_logit_scale=0.0",
        ],
        on_test_server(bench_env),
        tmp_path,
        timeout=600,
    )
    assert "--- seed 0: 150 URLs, data ready" in out.stdout, out.stdout
    scales = {}
    for name, model in (("recipe_seed0", "clipline-tiny"), ("small_batch_seed0", "clipline-tiny-small_batch")):
        line = rf"^{name}: heldout [0-9.]+ seen [0-9.]+ \| {model}, 3 steps .* logit scale (?P<scale>[0-9.]+), "
        found = re.search(line, out.stdout, re.MULTILINE)
        assert found, out.stdout
        scales[name] = float(found["scale"])
    # the config change took: exp(0) = 1 at the start, and 3 steps at lr 2e-3 barely move it (14.3 otherwise)
    assert scales["small_batch_seed0"] < 1.5 and scales["recipe_seed0"] > 10, scales
    means = out.stdout.split("--- means over 1 seed(s)")[1].split()
    assert {"recipe:", "small_batch:"} <= set(means), out.stdout
