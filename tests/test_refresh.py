"""The refresh flow: a new URL list in the inbox -> only its new URLs ingested -> a child snapshot
-> a version fine-tuned from the champion, registered with the champion as its parent. Plus the
inbox rules and the one-run-at-a-time lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import fsspec
import pytest

from clipline.components.catalog import Catalog
from clipline.components.config import load_config
from clipline.components.orchestration import RUN_LOCK, RunBusy, exclusive_run
from clipline.components.refresh import Inbox
from tests.pipelinekit import base_env, clipline, slice_url_list, small_overrides


# ----------------------------------------------------------------------------- inbox rules
def test_inbox_lists_only_url_lists_at_its_top_level_and_archives_them_without_overwriting(tmp_path):
    cfg = load_config(None, {"data_dir": tmp_path / "data"})
    inbox = Inbox.from_config(cfg)
    root = tmp_path / "data" / "inbox"
    assert inbox.location == str(root) and root.is_dir()
    for name in ("b.parquet", "a.csv", "c.txt.gz", "_partial.csv", ".hidden.csv", "notes.md"):
        (root / name).write_text("url,caption\n")
    (root / "sub").mkdir()
    (root / "sub" / "deep.csv").write_text("url,caption\n")
    assert [os.path.basename(p) for p in inbox.pending()] == ["a.csv", "b.parquet", "c.txt.gz"]

    (root / "done").mkdir()
    (root / "done" / "a.csv").write_text("an older list of the same name\n")
    moved = inbox.archive(inbox.pending())
    assert inbox.pending() == []
    assert (root / "done" / "a.csv").read_text() == "an older list of the same name\n"
    assert sorted(os.path.basename(p) for p in moved)[-2:] == ["b.parquet", "c.txt.gz"]
    assert any(p.endswith("-a.csv") for p in moved) and len(list((root / "done").iterdir())) == 4


def test_inbox_on_an_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/clipline-test-inbox/new.csv", b"url,caption\nhttp://example.com/a.jpg,a red circle\n")
    cfg = load_config(None, {"data_dir": tmp_path, "refresh": {"inbox": "memory://clipline-test-inbox"}})
    inbox = Inbox.from_config(cfg)
    pending = inbox.pending()
    assert pending == ["memory:///clipline-test-inbox/new.csv"] or pending == ["memory://clipline-test-inbox/new.csv"]
    from clipline.components.ingest.sources import read_url_lists

    assert read_url_lists(pending).column("caption").to_pylist() == ["a red circle"]
    inbox.archive(pending)
    assert inbox.pending() == [] and fs.exists("/clipline-test-inbox/done/new.csv")
    fs.rm("/clipline-test-inbox", recursive=True)


# ------------------------------------------------------------------------------------ lock
def test_a_second_run_fails_at_once_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    cfg = load_config(None, {"data_dir": tmp_path})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Catalog(cfg.catalog_path) as cat:  # a live process holds the lock
            cat.con.execute(
                "INSERT INTO locks VALUES (?, ?, ?, ?, now())",
                [RUN_LOCK, "clipline refresh (other)", holder.pid, __import__("socket").gethostname()],
            )
        with pytest.raises(RunBusy, match=rf"held by clipline refresh \(other\) \(pid {holder.pid}"):
            with exclusive_run(cfg, "me"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_run(cfg, "me"):  # its holder died: the lock is stale and is taken over
        with pytest.raises(RunBusy):
            with exclusive_run(cfg, "me again"):
                pass
    with Catalog(cfg.catalog_path, read_only=True) as cat:
        assert cat.con.execute("SELECT count(*) FROM locks").fetchone()[0] == 0


# ------------------------------------------------------------------------- refresh, end to end
@pytest.mark.slow
def test_refresh_ingests_only_new_urls_and_fine_tunes_the_champion(prefect_harness, mlflow_uri, tmp_path):
    from clipline.components.demo import serve_toy_web, write_heldout_set
    from clipline.components.tracking.runs import client
    from clipline.flows.pipeline import pipeline_flow
    from clipline.flows.refresh import refresh_flow, summary_rows

    heldout = write_heldout_set(tmp_path / "eval", n_per_class=3)
    cfg = load_config(
        None,
        small_overrides(
            tmp_path / "data",
            demo={"n_images": 200, "seed": 2, "fault_rate": 0.03},
            curate={"eval_set": heldout.data},
            refresh={"eval_sets": [heldout.data]},
        ),
    )
    with serve_toy_web(cfg.demo, tmp_path / "web") as web:
        cfg.ingest.allow_hosts = [web.allow_host]
        first_urls = slice_url_list(web.url_list, tmp_path / "lists" / "first.parquet", 0, 130)
        first = pipeline_flow([str(tmp_path / "lists" / "first.parquet")], cfg, eval_sets=[str(heldout.data)])
        assert first.evaluation.registry.alias == "champion"
        v1 = first.evaluation.registry.version

        # 40 URLs already ingested + 70 new ones, dropped in the inbox
        inbox_dir = cfg.data_dir / "inbox"
        new_urls = slice_url_list(web.url_list, inbox_dir / "more.parquet", 90, 200)
        (inbox_dir / "broken.csv").write_text("link,caption\nhttp://x/a.jpg,a list without a url column\n")
        result = refresh_flow(cfg=cfg)

    # only the new URLs were fetched
    assert result.ingest.n_listed == 110 and result.ingest.n_already_seen == 40 and result.ingest.n_fetched == 70
    with Catalog(cfg.catalog_path, read_only=True) as cat:
        n_urls = cat.con.execute("SELECT count(*), count(DISTINCT url) FROM urls").fetchone()
        assert n_urls == (200, 200) and len(set(first_urls) | set(new_urls)) == 200
        # a child snapshot of the first one
        assert result.curate.new and result.curate.parent_id == first.curate.snapshot_id
        assert cat.get_snapshot(result.curate.snapshot_id)["parent_id"] == first.curate.snapshot_id
    assert not (inbox_dir / "more.parquet").exists() and (inbox_dir / "done" / "more.parquet").exists()
    # the unreadable list is set aside with its reason; it did not stop the others
    assert list(result.failed_lists) == [str(inbox_dir / "broken.csv")]
    assert "url" in (inbox_dir / "failed" / "broken.csv.error.txt").read_text()
    assert (inbox_dir / "failed" / "broken.csv").exists() and not (inbox_dir / "broken.csv").exists()

    # a new version whose parent is the previous champion, trained from the champion's checkpoint
    c = client(cfg)
    name = cfg.tracking.registered_model
    reg = result.evaluation.registry
    assert result.parent_version == v1 and reg.version != v1
    mv = c.get_model_version(name, reg.version)
    assert mv.tags["parent_version"] == v1 and mv.tags["snapshot_id"] == result.curate.snapshot_id
    assert str(c.get_model_version_by_alias(name, reg.alias).version) == reg.version
    run = c.get_run(result.train.run_id)
    assert run.data.tags["clipline.parent_version"] == v1
    assert run.data.tags["clipline.parent_run_id"] == first.train.run_id
    v1_ckpt = cfg.data_dir / "models" / f"{name}-v{v1}" / "checkpoint"
    assert run.data.params["pretrained"].startswith(str(v1_ckpt))
    assert (v1_ckpt / "open_clip_config.json").is_file()

    # the driver's disk is lost with the catalog on it: `clipline catalog rebuild` recovers it from
    # the data dir, and a refresh of every list seen so far fetches nothing again
    def catalog_state():
        with Catalog(cfg.catalog_path, read_only=True) as cat:
            q = cat.con.execute
            return (
                q("SELECT url, status, error_kind, shard_id, attempts FROM urls ORDER BY url").fetchall(),
                q("SELECT snapshot_id, parent_id, n_rows FROM snapshots ORDER BY snapshot_id").fetchall(),
                q("SELECT * FROM snapshot_sources ORDER BY 1, 2").fetchall(),
            )

    before = catalog_state()
    cfg.catalog_path.unlink()
    proc = clipline(["--data-dir", str(cfg.data_dir), "catalog", "rebuild"], base_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "200 (" in proc.stdout and catalog_state() == before
    for lst in (tmp_path / "lists" / "first.parquet", inbox_dir / "done" / "more.parquet"):
        lst.rename(inbox_dir / lst.name)
    again = refresh_flow(cfg=cfg)  # the toy web is down: anything fetched would fail
    assert (again.ingest.n_listed, again.ingest.n_already_seen, again.ingest.n_fetched) == (200, 200, 0)
    assert again.curate.snapshot_id == result.curate.snapshot_id and again.skipped.startswith("nothing new")
    assert any(k == "training" and f"fine-tuned from v{v1}" in v for k, v in summary_rows(result))

    # nothing new in the inbox: no training, and it says so
    again = refresh_flow(cfg=cfg)
    assert again.lists == [] and again.ingest is None and not again.curate.new and again.train is None
    assert "nothing new" in again.skipped
    assert len(c.search_model_versions(f"name = '{name}'")) == 2


def test_a_run_waits_for_the_holder_when_asked(tmp_path):
    cfg = load_config(None, {"data_dir": tmp_path, "refresh": {"lock_wait_s": 60}})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    threading.Thread(target=holder.wait, daemon=True).start()  # reap it when it ends (no zombie)
    try:
        with Catalog(cfg.catalog_path) as cat:
            cat.con.execute(
                "INSERT INTO locks VALUES (?, 'a short run', ?, ?, now())",
                [RUN_LOCK, holder.pid, __import__("socket").gethostname()],
            )
        with exclusive_run(cfg, "patient"):  # waits until the holder is gone, then takes the lock
            assert holder.poll() is not None
            with Catalog(cfg.catalog_path, read_only=True) as cat:
                assert cat.con.execute("SELECT holder FROM locks").fetchall() == [("patient",)]
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------ the command
@pytest.mark.slow
def test_refresh_command_says_when_there_is_nothing_to_do_and_fails_in_one_line_when_busy(
    prefect_harness, tmp_path, mlflow_uri
):
    from prefect.settings import PREFECT_API_URL

    env = base_env(PREFECT_API_URL=PREFECT_API_URL.value(), MLFLOW_TRACKING_URI=mlflow_uri)
    args = ["--data-dir", str(tmp_path / "data"), "refresh"]
    res = clipline(args, env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "nothing to do" in res.stdout and (tmp_path / "data" / "inbox").is_dir()

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with Catalog(tmp_path / "data" / "catalog.duckdb") as cat:
            cat.con.execute(
                "INSERT INTO locks VALUES (?, 'clipline refresh (pid 1)', ?, ?, now())",
                [RUN_LOCK, holder.pid, __import__("socket").gethostname()],
            )
        res = clipline(args, env, cwd=tmp_path, timeout=300)
        # the same without a Prefect server: Prefect's own exit logging (its temporary server
        # stopping, its event worker draining) must not come after the reason
        alone = clipline(args, base_env(MLFLOW_TRACKING_URI=mlflow_uri), cwd=tmp_path, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    for r in (res, alone):
        assert r.returncode == 1, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "is held by clipline refresh" in last and "try again later" in last, (
            r.stderr[-3000:]
        )


@pytest.mark.slow
def test_serve_refuses_without_a_prefect_server_and_a_bad_schedule_in_one_line(tmp_path):
    res = clipline(["--data-dir", str(tmp_path), "serve"], base_env(), cwd=tmp_path, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: clipline serve needs a Prefect server")
    # a schedule Prefect cannot read is refused before anything is served (no server is reached)
    res = clipline(
        ["--data-dir", str(tmp_path), "serve", "--cron", "61 * * * *"],
        base_env(PREFECT_API_URL="http://127.0.0.1:9/api"),
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: refresh schedule:") and "61 * * * *" in last


def test_deployment_parameters_are_json_and_rebuild_the_same_config_elsewhere(tmp_path, monkeypatch):
    import json

    from clipline.components.orchestration.params import SERVED_LOCK_WAIT_S, deployment_parameters, run_config
    from tests.pipelinekit import write_toml

    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "my.toml", {"train": {"steps": 7}})
    cfg = load_config(tmp_path / "my.toml", {"data_dir": "rel-data", "ingest": {"allow_hosts": ["127.0.0.1:8123"]}})
    params = json.loads(json.dumps(deployment_parameters(tmp_path / "my.toml", cfg)))
    monkeypatch.chdir("/")  # a served run starts somewhere else
    again = run_config(None, params["config_file"], params["overrides"])
    assert again.data_dir == tmp_path / "rel-data" and again.train.steps == 7
    assert again.ingest.allow_hosts == ["127.0.0.1:8123"] and again.refresh.lock_wait_s == SERVED_LOCK_WAIT_S


def test_unreadable_lists_are_named_with_their_reason_and_quarantined(tmp_path):
    from clipline.components.refresh import unreadable_lists

    cfg = load_config(None, {"data_dir": tmp_path})
    inbox = Inbox.from_config(cfg)
    root = tmp_path / "inbox"
    (root / "good.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red circle\n")
    (root / "nourl.csv").write_text("link,caption\nhttp://example.com/a.jpg,a red circle\n")
    (root / "garbage.parquet").write_bytes(b"not parquet at all")
    bad = unreadable_lists(cfg, inbox.pending())
    assert sorted(os.path.basename(p) for p in bad) == ["garbage.parquet", "nourl.csv"]
    assert "url" in bad[str(root / "nourl.csv")]
    moved = inbox.quarantine(str(root / "nourl.csv"), bad[str(root / "nourl.csv")])
    assert moved == str(root / "failed" / "nourl.csv")
    assert (root / "failed" / "nourl.csv.error.txt").read_text().strip() == bad[str(root / "nourl.csv")]
    assert [os.path.basename(p) for p in inbox.pending()] == ["garbage.parquet", "good.csv"]
