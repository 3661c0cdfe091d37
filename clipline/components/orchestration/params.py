"""Flow parameters a Prefect deployment can store (a config file path and a dict of overrides,
JSON), turned back into the one typed :class:`Config` inside the run, and the bounds that the
serving process puts on them.

**What a served run may change.** Anyone who may start a run of a served deployment with custom
parameters (any user of a shared Prefect server) would otherwise choose the worker's whole
configuration. So `clipline serve` captures its own configuration when it starts
(:class:`ServePolicy`, handed to its runs through the environment, which run parameters cannot
reach) and every run of its deployments starts from it:

- worker-only settings (:data:`WORKER_SETTINGS`: the SSRF guard, the allow-list, where results
  are tracked) and worker-only paths (:data:`WORKER_PATHS`: the data and state dirs, the inbox, spill
  directory, SQL rules file, the allowed input roots, the config file itself) come from the
  worker. A run may restate the worker's value, may switch the SSRF guard on and may name a part
  of the allow-list; anything else is refused;
- every other path-valued setting, and the files a run names as parameters (``url_lists``,
  ``eval_sets``, ``decontaminate``, a ``from_model`` checkpoint), must lie inside one of the
  worker's ``refresh.input_roots`` (folders or fsspec URL prefixes; none by default, so a run may
  then name no file at all); symbolic links and ``..`` are resolved first;
- a whole ``cfg`` is refused.

A refused run fails at its start, before anything is read or fetched, with
:class:`RunRefused` naming each parameter, the worker's value and who may change it.
Without a policy in the environment (in-process calls, `clipline run`), parameters are taken as
they come.
"""

from __future__ import annotations

import json
import os
import re
import typing
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from clipline.components.config import DEFAULT_CONFIG_FILE, Config, ConfigError, _format_errors, load_config

#: how long a served run waits for another pipeline/refresh run when refresh.lock_wait_s is 0
SERVED_LOCK_WAIT_S = 3600.0

#: the environment variable through which `clipline serve` hands its policy to its runs
POLICY_ENV = "CLIPLINE_SERVE_POLICY"

#: security settings only the serving process sets
WORKER_SETTINGS = ("ingest.ssrf_guard", "ingest.allow_hosts", "tracking.tracking_uri")
#: paths only the serving process sets: where a run writes, what SQL it runs, what it may read
WORKER_PATHS = (
    "data_dir",
    "state_dir",
    "refresh.inbox",
    "refresh.input_roots",
    "curate.duckdb_temp_dir",
    "curate.rules_file",
)

#: a `from_model` that names no file: a registered version or alias (resolved in the worker's own
#: registry) or a hub start (hf-hub:org/repo, an open_clip tag or MODEL:TAG, fetched by the worker)
_REGISTRY_REF = re.compile(r"models:/\S+|\d+|[A-Za-z][\w-]*|hf-hub:[\w.-]+/[\w.-]+|[A-Za-z][\w.-]*:[\w.-]+")


def _names_no_file(value: str) -> bool:
    """A start (``from_model``, ``train.pretrained``) that names a registered version or alias or
    hub weights, and no file on the worker."""
    return _REGISTRY_REF.fullmatch(value) is not None and not Path(value).exists()


class RunRefused(ValueError):
    """A served run's parameters change what only the worker may set; the message names them."""


_REFUSED = "this served run was refused: "


def _mentions_path(annotation: Any) -> bool:
    if annotation is Path:
        return True
    return any(_mentions_path(a) for a in typing.get_args(annotation))


def input_path_fields() -> list[str]:
    """Every path-valued setting a run may set inside the input roots (``section.field``): all of
    them but :data:`WORKER_PATHS`; a path setting added later is bounded the same way."""
    out = []
    for name, field in Config.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [f"{name}.{sub}" for sub, f in ann.model_fields.items() if _mentions_path(f.annotation)]
        elif _mentions_path(ann):
            out.append(name)
    return [f for f in out if f not in WORKER_PATHS and not f.startswith("demo.")]


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else getattr(data, part)
    return data


def _shown(value: Any) -> str:
    return json.dumps(value, default=str)


# ------------------------------------------------------------------- locations
def _local(loc: str) -> str | None:
    """The real absolute path of a local location (symbolic links and '..' resolved), or None
    for a URL."""
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    if "://" in loc or "::" in loc:
        return None
    return os.path.realpath(os.path.expanduser(loc))


def _url_path_escapes(url: str) -> bool:
    path = urllib.parse.unquote(url.split("://", 1)[1])
    return bool(re.search(r"(^|/)\.\.?(/|$)", path)) or "\\" in path


def inside(loc: str, roots: tuple[str, ...] | list[str]) -> bool:
    """Whether ``loc`` (a path or an fsspec URL) lies inside one of ``roots``."""
    local = _local(loc)
    for root in roots:
        rlocal = _local(root)
        if local is not None and rlocal is not None:
            if local == rlocal or local.startswith(rlocal.rstrip(os.sep) + os.sep):
                return True
        elif local is None and rlocal is None and "::" not in loc and not _url_path_escapes(loc):
            r = root.rstrip("/")
            if loc == r or loc.startswith(r + "/"):
                return True
    return False


def _canonical(loc: str) -> str:
    local = _local(loc)
    return local if local is not None else loc


# ------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class ServePolicy:
    """The serving process's own configuration, which bounds what its runs' parameters change
    (see the module docstring)."""

    config: dict[str, Any]  # the worker's configuration (Config, as JSON)
    config_file: str | None  # the worker's config file, absolute (None: none)
    input_roots: tuple[str, ...]  # where runs may name files, resolved

    @classmethod
    def capture(cls, config_file: Path | None, cfg: Config) -> "ServePolicy":
        """The policy of a `clipline serve` started with ``config_file`` and ``cfg``: its data dir
        and state dir made absolute, and served runs waiting for the run lock (``SERVED_LOCK_WAIT_S`` when
        ``refresh.lock_wait_s`` is 0)."""
        params = deployment_parameters(config_file, cfg)
        worker = cfg.model_copy(deep=True)
        worker.data_dir = cfg.data_dir.resolve()
        if cfg.state_dir is not None:
            worker.state_dir = cfg.state_dir.resolve()
        worker.refresh.lock_wait_s = params["overrides"]["refresh"]["lock_wait_s"]
        roots = tuple(_canonical(r) for r in cfg.refresh.input_roots)
        worker.refresh.input_roots = list(roots)
        return cls(config=worker.model_dump(mode="json"), config_file=params["config_file"], input_roots=roots)

    def to_env(self) -> dict[str, str]:
        return {
            POLICY_ENV: json.dumps(
                {"config": self.config, "config_file": self.config_file, "input_roots": list(self.input_roots)}
            )
        }

    @classmethod
    def from_env(cls) -> "ServePolicy | None":
        raw = os.environ.get(POLICY_ENV)
        if not raw:
            return None
        d = json.loads(raw)
        return cls(config=d["config"], config_file=d["config_file"], input_roots=tuple(d["input_roots"]))

    def worker_config(self) -> Config:
        return Config(**self.config)

    def _outside(self, loc: str) -> bool:
        return not inside(loc, self.input_roots)

    # ---- checks
    def refusal(self, worker_only: list[str], outside: list[str], other: list[str]) -> RunRefused | None:
        """One :class:`RunRefused` for everything refused, grouped by who may change it."""
        parts = list(other)
        if worker_only:
            it = "it" if len(worker_only) == 1 else "them"
            parts.append(
                "only the worker sets " + ", ".join(worker_only) + f": change {it} in the configuration of "
                "the `clipline serve` process (its --config file, CLIPLINE_* environment or flags) and "
                "restart it"
            )
        if outside:
            parts.append(
                ", ".join(outside) + (" is" if len(outside) == 1 else " are") + " outside the folders this "
                f"worker lets runs read from (refresh.input_roots: {', '.join(self.input_roots) or 'none'}): "
                "put the files inside one, or have the worker name theirs (`clipline serve --input-root "
                "DIR`, or refresh.input_roots in its configuration)"
            )
        return RunRefused(_REFUSED + "; ".join(parts)) if parts else None

    def _check_config(
        self,
        cfg: Config | None,
        config_file: str | None,
        overrides: dict[str, Any] | None,
        worker_only: list[str],
        outside: list[str],
        other: list[str],
    ) -> Config:
        if cfg is not None:
            other.append(
                "cfg: a served run takes its configuration from the worker; give settings as "
                "`overrides` (nested sections, JSON)"
            )
        if config_file and _canonical(str(config_file)) != (self.config_file and _canonical(self.config_file)):
            worker_only.append(f"config_file = {_shown(config_file)} (the worker's: {_shown(self.config_file)})")
        worker = self.worker_config()
        run = worker
        if overrides:
            try:
                run = Config(**_deep_merge(self.config, overrides))
            except ValidationError as e:
                raise ConfigError(_format_errors(e, "the run's overrides")) from e
        for setting in (*WORKER_SETTINGS, *WORKER_PATHS):
            new, mine = _get(run, setting), _get(worker, setting)
            if setting == "ingest.allow_hosts" and set(new) <= set(mine):
                continue  # naming fewer exempt hosts only narrows the guard
            if setting == "ingest.ssrf_guard" and new:
                continue
            if setting in ("data_dir", "state_dir", "curate.duckdb_temp_dir", "curate.rules_file"):
                same = (new is None and mine is None) or (
                    new is not None and mine is not None and _canonical(str(new)) == _canonical(str(mine))
                )
            elif setting == "refresh.input_roots":
                same = [_canonical(r) for r in new] == list(mine)
            else:
                same = new == mine
            if not same:
                given = _get(overrides or {}, setting) if _has(overrides or {}, setting) else new
                worker_only.append(f"overrides.{setting} = {_shown(given)} (the worker's: {_shown(mine)})")
        updates: list[tuple[str, Any]] = []
        for setting in input_path_fields():
            new, mine = _get(run, setting), _get(worker, setting)
            if new == mine:
                continue
            values = new if isinstance(new, list) else [new]
            fileless = [v for v in values if setting == "train.pretrained" and _names_no_file(str(v))]
            bad = [str(v) for v in values if v is not None and v not in fileless and self._outside(str(v))]
            if bad:
                outside.append(f"overrides.{setting} = {_shown(bad if isinstance(new, list) else bad[0])}")
                continue
            # what was checked is what is read
            fixed = [v if v in fileless else Path(_canonical(str(v))) for v in values if v is not None]
            updates.append((setting, fixed if isinstance(new, list) else (fixed[0] if fixed else None)))
        for setting, value in updates:
            section, field = setting.split(".", 1)
            setattr(getattr(run, section), field, value)
        return run

    def _check_inputs(self, named: dict[str, Any], outside: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in named.items():
            if value is None:
                out[name] = None
                continue
            many = isinstance(value, (list, tuple))
            fixed = []
            for i, v in enumerate(value if many else [value]):
                v = str(v)
                if name == "from_model" and _names_no_file(v):
                    fixed.append(v)  # a version or alias of the worker's own registry, or a hub start
                elif self._outside(v):
                    outside.append(f"{name}[{i}] = {_shown(v)}" if many else f"{name} = {_shown(v)}")
                else:
                    fixed.append(_canonical(v))  # what was checked is what is read
            out[name] = fixed if many else (fixed[0] if fixed else None)
        return out

    def check(
        self, cfg: Config | None, config_file: str | None, overrides: dict[str, Any] | None, **inputs: Any
    ) -> tuple[Config, dict[str, Any]]:
        """The configuration of a served run (the worker's, with the run's ``overrides`` where the
        policy lets them through) and the files it names as flow parameters (``inputs``: a
        location or a list of them, by parameter name; ``from_model`` may also be a registered
        version or alias), as absolute locations. Raises one :class:`RunRefused` naming every
        parameter refused."""
        worker_only: list[str] = []
        outside: list[str] = []
        other: list[str] = []
        run = self._check_config(cfg, config_file, overrides, worker_only, outside, other)
        checked = self._check_inputs(inputs, outside)
        refused = self.refusal(worker_only, outside, other)
        if refused is not None:
            raise refused
        return run, checked


def _has(data: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        elif v is not None:
            out[k] = v
    return out


# ------------------------------------------------------------------- flows' entry points
def served_policy() -> ServePolicy | None:
    """The policy of the `clipline serve` process running this flow, or None when not served."""
    return ServePolicy.from_env()


def run_config(cfg: Config | None, config_file: str | None, overrides: dict[str, Any] | None) -> Config:
    """The configuration of a flow run. Served (a policy in the environment): the worker's, with
    the run's ``overrides`` where :class:`ServePolicy` allows them. Otherwise ``cfg`` when given (an
    in-process call), else the config built from ``config_file`` (None: ./clipline.toml when
    present), the CLIPLINE_* environment of the run, and ``overrides``."""
    policy = served_policy()
    if policy is not None:
        return policy.check(cfg, config_file, overrides)[0]
    if cfg is not None:
        return cfg
    return load_config(Path(config_file) if config_file else None, overrides or None)


def served_run(
    cfg: Config | None, config_file: str | None, overrides: dict[str, Any] | None, **inputs: Any
) -> tuple[Config, dict[str, Any]]:
    """A flow run's configuration (:func:`run_config`) and the files it names as parameters
    (``inputs``, by parameter name): as given when not served, else bounded by the serving
    process's policy (:meth:`ServePolicy.check`)."""
    policy = served_policy()
    if policy is None:
        return run_config(cfg, config_file, overrides), dict(inputs)
    return policy.check(cfg, config_file, overrides, **inputs)


def deployment_parameters(config_file: Path | None, cfg: Config) -> dict[str, Any]:
    """The parameters that make a served run see this command's configuration: the config file,
    data dir and state dir as absolute paths (a served run may start in another directory), the SSRF
    allow-list (often given as flags), and a lock wait (``refresh.lock_wait_s``, or an hour when
    that is 0) so that a `pipeline` run and a `refresh` run meeting on the data dir queue up.
    Under `clipline serve` these are the worker's own values, which a run may restate."""
    if config_file is None and DEFAULT_CONFIG_FILE.exists():
        config_file = DEFAULT_CONFIG_FILE
    overrides: dict[str, Any] = {"data_dir": str(cfg.data_dir.resolve())}
    if cfg.state_dir is not None:
        overrides["state_dir"] = str(cfg.state_dir.resolve())
    if cfg.ingest.allow_hosts:
        overrides["ingest"] = {"allow_hosts": list(cfg.ingest.allow_hosts)}
    # a scheduled refresh meeting an on-demand pipeline run (two deployments, each limited to one
    # run at a time) waits for it instead of failing, unless the config says how long to wait
    overrides["refresh"] = {"lock_wait_s": cfg.refresh.lock_wait_s or SERVED_LOCK_WAIT_S}
    return {"config_file": str(Path(config_file).resolve()) if config_file else None, "overrides": overrides}
