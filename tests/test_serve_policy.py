"""The bounds `clipline serve` puts on its runs' parameters (clipline.components.orchestration.params),
checked directly; test_services.py checks them on a served deployment."""

from __future__ import annotations

import pytest

from clipline.components.config import Config, load_config
from clipline.components.orchestration.params import (
    POLICY_ENV,
    WORKER_PATHS,
    RunRefused,
    ServePolicy,
    inside,
    input_path_fields,
    run_config,
    served_run,
)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A worker's policy in the environment, as `clipline serve` leaves it for its runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.csv").write_text("url,caption\n")
    (tmp_path / "lists" / "escape").symlink_to("/etc")
    cfg = load_config(
        None,
        {
            "data_dir": "data",
            "ingest": {"allow_hosts": ["127.0.0.1:9001", "127.0.0.1:9002"]},
            "refresh": {"input_roots": ["lists", "s3://bucket/lists/"]},
        },
    )
    policy = ServePolicy.capture(None, cfg)
    monkeypatch.setenv(POLICY_ENV, policy.to_env()[POLICY_ENV])
    return tmp_path


def _refusal(**kw) -> str:
    with pytest.raises(RunRefused) as e:
        served_run(kw.pop("cfg", None), kw.pop("config_file", None), kw.pop("overrides", None), **kw)
    return str(e.value)


def test_every_path_setting_is_either_the_workers_or_bounded_by_the_input_roots():
    paths = set(input_path_fields())
    assert {"evaluate.datasets", "train.pretrained", "curate.eval_set", "refresh.eval_sets"} <= paths
    assert not paths & set(WORKER_PATHS)
    for section, model in Config.model_fields.items():  # no path setting slips through both lists
        ann = model.annotation
        fields = getattr(ann, "model_fields", {})
        for name, f in fields.items():
            if "Path" in str(f.annotation) and section != "demo":
                assert f"{section}.{name}" in paths | set(WORKER_PATHS), f"{section}.{name}"


def test_inside_resolves_links_and_dots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    assert inside(str(root / "sub" / "x.csv"), [str(root)])
    assert not inside(str(root / "sub" / ".." / ".." / "x.csv"), [str(root)])
    assert not inside(str(root / "out" / "x.csv"), [str(root)])  # a link out of the root
    assert not inside(str(tmp_path / "root-sibling" / "x.csv"), [str(root)])
    assert inside("s3://b/lists/x.csv", ["s3://b/lists/"])
    assert not inside("s3://b/lists-other/x.csv", ["s3://b/lists"])
    assert not inside("s3://b/lists/../secret.csv", ["s3://b/lists/"])
    assert not inside("http://169.254.169.254/latest/meta-data", ["s3://b/lists/"])
    assert not inside(str(root / "x.csv"), [])


def test_a_served_run_keeps_the_workers_security_and_may_change_the_rest(served):
    cfg, inputs = served_run(
        None,
        None,
        {"data_dir": str(served / "data"), "train": {"steps": 3}, "ingest": {"allow_hosts": ["127.0.0.1:9001"]}},
        url_lists=["lists/a.csv", "s3://bucket/lists/b.csv"],
        from_model="champion",
    )
    assert cfg.data_dir == served / "data" and cfg.train.steps == 3
    assert cfg.ingest.ssrf_guard and cfg.ingest.allow_hosts == ["127.0.0.1:9001"]  # narrowed, not widened
    assert cfg.refresh.lock_wait_s > 0  # served runs queue for the run lock
    assert inputs == {
        "url_lists": [str(served / "lists" / "a.csv"), "s3://bucket/lists/b.csv"],
        "from_model": "champion",
    }
    # the deployment's own default parameters restate the worker's values: accepted
    assert served_run(None, None, None)[0].data_dir == served / "data"
    # hub starts name no file on the worker: taken as given, as a start parameter and a setting
    hub = "hf-hub:acme/nano-clip"
    cfg, inputs = served_run(None, None, {"train": {"pretrained": "ViT-B-32:laion2b_s34b_b79k"}}, from_model=hub)
    assert inputs == {"from_model": hub} and cfg.train.pretrained == "ViT-B-32:laion2b_s34b_b79k"
    cfg, _ = served_run(None, None, {"train": {"pretrained": "lists/a.csv"}})
    assert cfg.train.pretrained == served / "lists" / "a.csv"  # a file inside the roots, as checked


def test_a_worker_with_a_state_dir_gives_it_to_its_runs_and_a_run_may_restate_it(tmp_path, monkeypatch):
    """`clipline --state-dir S serve`: its runs keep their catalog and MLflow store in S; the parameters
    `clipline run --deployment --state-dir S` sends (deployment_parameters) restate it and are accepted."""
    from clipline.components.orchestration.params import deployment_parameters

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"data_dir": "data", "state_dir": "state"})
    monkeypatch.setenv(POLICY_ENV, ServePolicy.capture(None, cfg).to_env()[POLICY_ENV])
    params = deployment_parameters(None, cfg)
    assert params["overrides"]["state_dir"] == str(tmp_path / "state")
    for overrides in (None, params["overrides"]):
        run_cfg, _ = served_run(None, None, overrides)
        assert run_cfg.state_dir == tmp_path / "state" and run_cfg.catalog_path == tmp_path / "state" / "catalog.duckdb"


def test_a_served_run_that_would_loosen_the_worker_is_refused_naming_each_parameter(served):
    msg = _refusal(
        config_file="/tmp/other.toml",
        url_lists=["/etc/hostname", "lists/escape/passwd"],
        overrides={
            "ingest": {"ssrf_guard": False, "allow_hosts": ["169.254.169.254:80"]},
            "data_dir": "/",
            "state_dir": "/tmp/elsewhere",
            "tracking": {"tracking_uri": "http://elsewhere:5000"},
            "curate": {"rules_file": "/tmp/evil.sql"},
            "refresh": {"input_roots": ["/"]},
            "evaluate": {"datasets": ["/etc"]},
        },
    )
    assert msg.startswith("this served run was refused: only the worker sets ")
    for named in (
        'config_file = "/tmp/other.toml"',
        "overrides.ingest.ssrf_guard = false (the worker's: true)",
        'overrides.ingest.allow_hosts = ["169.254.169.254:80"]',
        'overrides.data_dir = "/"',
        'overrides.state_dir = "/tmp/elsewhere" (the worker\'s: null)',
        "overrides.tracking.tracking_uri",
        "overrides.curate.rules_file",
        "overrides.refresh.input_roots",
        'overrides.evaluate.datasets = ["/etc"]',
        'url_lists[0] = "/etc/hostname"',
        'url_lists[1] = "lists/escape/passwd"',
        "clipline serve --input-root",
    ):
        assert named in msg, (named, msg)
    # a whole config, or a checkpoint outside the roots, is refused too
    assert "cfg: a served run takes its configuration from the worker" in _refusal(cfg=Config())
    assert 'from_model = "/etc/passwd"' in _refusal(from_model="/etc/passwd")
    assert 'overrides.train.pretrained = "/etc/passwd"' in _refusal(overrides={"train": {"pretrained": "/etc/passwd"}})


def test_without_a_worker_policy_parameters_are_taken_as_given(tmp_path, monkeypatch):
    monkeypatch.delenv(POLICY_ENV, raising=False)
    cfg = run_config(None, None, {"data_dir": str(tmp_path), "ingest": {"ssrf_guard": False}})
    assert cfg.data_dir == tmp_path and cfg.ingest.ssrf_guard is False
