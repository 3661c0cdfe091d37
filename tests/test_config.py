from pathlib import Path

import pytest

from clipline.components.config import ConfigError, load_config


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.ingest.image_size == 256
    assert cfg.ingest.resize_mode == "border"
    assert cfg.catalog_path == Path("clipline-data") / "catalog.duckdb"


def test_file_env_and_flags_in_priority_order(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text('data_dir = "from-file"\n[ingest]\nimage_size = 128\nencode_quality = 80\n')
    cfg = load_config(f)
    assert cfg.ingest.image_size == 128 and cfg.data_dir == Path("from-file")
    monkeypatch.setenv("CLIPLINE_INGEST__IMAGE_SIZE", "64")
    cfg = load_config(f)
    assert cfg.ingest.image_size == 64 and cfg.ingest.encode_quality == 80
    cfg = load_config(f, {"ingest": {"image_size": 32}, "data_dir": tmp_path / "flag"})
    assert cfg.ingest.image_size == 32 and cfg.ingest.encode_quality == 80
    assert cfg.data_dir == tmp_path / "flag"


def test_default_file_in_working_dir_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clipline.toml").write_text("[ingest]\nresize_mode = 'center_crop'\n")
    assert load_config().ingest.resize_mode == "center_crop"


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[ingest]\nresize_mode = 'squash'\n", "ingest.resize_mode"),
        ("[ingest]\nimage_size = -3\n", "ingest.image_size"),
        ("[ingest]\nno_such_option = 1\n", "ingest.no_such_option"),
        ("[nosection]\nx = 1\n", "nosection"),
    ],
)
def test_invalid_value_names_field_and_file(tmp_path, toml, needle):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_invalid_env_value_is_named(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPLINE_INGEST__ENCODE_QUALITY", "500")
    with pytest.raises(ConfigError) as e:
        load_config()
    assert "encode_quality" in str(e.value) and "environment" in str(e.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_state_dir_holds_the_local_state_and_defaults_to_the_data_dir(tmp_path, monkeypatch):
    from clipline.components.curate.db import con_temp_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, {"data_dir": tmp_path / "data"})
    assert cfg.state_dir is None and cfg.state_root == tmp_path / "data"
    assert cfg.catalog_path == tmp_path / "data" / "catalog.duckdb"
    monkeypatch.setenv("CLIPLINE_STATE_DIR", str(tmp_path / "env-state"))
    cfg = load_config(None, {"data_dir": tmp_path / "data"})
    assert cfg.catalog_path == tmp_path / "env-state" / "catalog.duckdb"
    cfg = load_config(None, {"data_dir": tmp_path / "data", "state_dir": tmp_path / "state"})
    assert cfg.catalog_path == tmp_path / "state" / "catalog.duckdb"
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert con_temp_dir(cfg) == tmp_path / "state" / "tmp" / "duckdb"
    # bulk data stays in the data dir
    assert (cfg.raw_dir, cfg.snapshots_dir, cfg.checkpoints_dir, cfg.reports_dir) == tuple(
        tmp_path / "data" / d for d in ("raw", "snapshots", "checkpoints", "reports")
    )
