"""Flow parameters a Prefect deployment can store: a config file path and a dict of overrides
(JSON), turned back into the one typed :class:`Config` inside the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipline.components.config import DEFAULT_CONFIG_FILE, Config, load_config


#: how long a served run waits for another pipeline/refresh run when refresh.lock_wait_s is 0
SERVED_LOCK_WAIT_S = 3600.0


def run_config(cfg: Config | None, config_file: str | None, overrides: dict[str, Any] | None) -> Config:
    """``cfg`` when given (an in-process call), else the config built from ``config_file`` (None:
    ./clipline.toml when present), the CLIPLINE_* environment of the run, and ``overrides``."""
    if cfg is not None:
        return cfg
    return load_config(Path(config_file) if config_file else None, overrides or None)


def deployment_parameters(config_file: Path | None, cfg: Config) -> dict[str, Any]:
    """The parameters that make a served run see this command's configuration: the config file
    and data dir as absolute paths (a served run may start in another directory), the SSRF
    allow-list (often given as flags), and a lock wait (``refresh.lock_wait_s``, or an hour when
    that is 0) so that a `pipeline` run and a `refresh` run meeting on the data dir queue up."""
    if config_file is None and DEFAULT_CONFIG_FILE.exists():
        config_file = DEFAULT_CONFIG_FILE
    overrides: dict[str, Any] = {"data_dir": str(cfg.data_dir.resolve())}
    if cfg.ingest.allow_hosts:
        overrides["ingest"] = {"allow_hosts": list(cfg.ingest.allow_hosts)}
    # a scheduled refresh meeting an on-demand pipeline run (two deployments, each limited to one
    # run at a time) waits for it instead of failing, unless the config says how long to wait
    overrides["refresh"] = {"lock_wait_s": cfg.refresh.lock_wait_s or SERVED_LOCK_WAIT_S}
    return {"config_file": str(Path(config_file).resolve()) if config_file else None, "overrides": overrides}
