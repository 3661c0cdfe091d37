"""The model registry: one registered model, a new version per trained model, and the promotion rule.

Promotion rule (``decide_promotion``): a new version becomes ``champion`` when there is no
champion yet, or when its primary metric (``cfg.evaluate.primary_metric``, for example
``zeroshot/heldout/acc1``: a metric on a chosen eval set) is strictly greater than the current
champion's value plus ``cfg.evaluate.promotion_margin``. Otherwise it gets the ``challenger``
alias. A version without the primary metric is never promoted over an existing champion. The
decision, its reason and both numbers are logged into the candidate's run (tags
``promotion.*``, metrics ``promotion/candidate`` and ``promotion/champion``) and set as tags on
the model version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from clipline.components.config import Config
from clipline.components.tracking.runs import client, code_version, config_hash, log_metrics

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryError(ValueError):
    """A registry lookup or registration that cannot be done; the message says what to do."""


@dataclass
class PromotionDecision:
    promote: bool
    metric: str
    candidate_value: float | None
    champion_value: float | None
    champion_version: str | None
    margin: float
    reason: str


@dataclass
class RegistryResult:
    """A registered version and the alias it was given (``champion`` or ``challenger``)."""

    name: str
    version: str
    alias: str
    decision: PromotionDecision
    model_uri: str
    run_id: str

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def decide_promotion(candidate: float | None, champion: float | None, margin: float, metric: str,
                     champion_version: str | None = None) -> PromotionDecision:
    """The documented rule (see the module docstring), as a pure function."""
    if champion_version is None:
        return PromotionDecision(True, metric, candidate, None, None, margin, "no champion yet")
    if candidate is None:
        return PromotionDecision(False, metric, None, champion, champion_version, margin,
                                 f"candidate has no '{metric}' metric")
    if champion is None:
        return PromotionDecision(True, metric, candidate, None, champion_version, margin,
                                 f"champion v{champion_version} has no '{metric}' metric")
    if candidate > champion + margin:
        return PromotionDecision(True, metric, candidate, champion, champion_version, margin,
                                 f"{candidate:.4f} > champion {champion:.4f} + margin {margin:g}")
    return PromotionDecision(False, metric, candidate, champion, champion_version, margin,
                             f"{candidate:.4f} <= champion {champion:.4f} + margin {margin:g}")


def current_alias(cfg: Config, alias: str) -> Any | None:
    """The model version holding ``alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client(cfg).get_model_version_by_alias(cfg.tracking.registered_model, alias)
    except MlflowException:
        return None


def run_metric(cfg: Config, run_id: str, metric: str) -> float | None:
    """The latest value of ``metric`` in a run, or None."""
    return client(cfg).get_run(run_id).data.metrics.get(metric)


def register_and_promote(cfg: Config, run_id: str, model_uri: str, metrics: Mapping[str, float],
                         snapshot_id: str | None, parent_version: str | None = None) -> RegistryResult:
    """Register ``model_uri`` as a new version of ``cfg.tracking.registered_model`` and set its alias.

    Tags on the version: ``snapshot_id``, ``parent_version`` (when fine-tuned), ``config_hash``,
    ``code_version``, ``run_id``, and the promotion decision. ``metrics`` are the candidate's
    evaluation metrics (they are also looked up in the run when the primary one is missing).
    """
    import mlflow

    c = client(cfg)
    name = cfg.tracking.registered_model
    primary = cfg.evaluate.primary_metric
    champion_mv = current_alias(cfg, CHAMPION)
    champion_value = run_metric(cfg, champion_mv.run_id, primary) if champion_mv is not None else None
    candidate_value = metrics.get(primary)
    if candidate_value is None:
        candidate_value = run_metric(cfg, run_id, primary)

    tags = {"snapshot_id": snapshot_id or "", "config_hash": config_hash(cfg), "code_version": code_version(),
            "run_id": run_id}
    if parent_version:
        tags["parent_version"] = str(parent_version)
    mv = mlflow.register_model(model_uri, name, tags=tags)
    version = str(mv.version)

    decision = decide_promotion(candidate_value, champion_value, cfg.evaluate.promotion_margin, primary,
                                champion_version=str(champion_mv.version) if champion_mv is not None else None)
    alias = CHAMPION if decision.promote else CHALLENGER
    c.set_registered_model_alias(name, alias, version)
    if decision.promote and champion_mv is not None and str(champion_mv.version) != version:
        c.set_model_version_tag(name, str(champion_mv.version), "replaced_by", version)

    # log the decision and both numbers, on the version and in the run
    vtags = {"promotion.decision": alias, "promotion.reason": decision.reason, "promotion.metric": primary,
             "promotion.margin": f"{decision.margin:g}",
             "promotion.champion_version": decision.champion_version or ""}
    for k, v in vtags.items():
        c.set_model_version_tag(name, version, k, v)
        c.set_tag(run_id, k, v)
    c.set_tag(run_id, "registered_model_version", version)
    nums = {}
    if candidate_value is not None:
        nums["promotion/candidate"] = candidate_value
    if champion_value is not None:
        nums["promotion/champion"] = champion_value
    if nums:
        log_metrics(cfg, run_id, nums)
    return RegistryResult(name=name, version=version, alias=alias, decision=decision, model_uri=model_uri,
                          run_id=run_id)


# ----- resolving what the user calls a model -----

@dataclass
class ResolvedModel:
    """Where a model reference points: a local checkpoint directory, and its run/version if known."""

    ref: str
    checkpoint_dir: Path
    run_id: str | None = None
    version: str | None = None
    snapshot_id: str | None = None


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))$")


def _version_for(cfg: Config, name: str, version: str | None, alias: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    try:
        if alias is not None:
            return c.get_model_version_by_alias(name, alias)
        return c.get_model_version(name, str(version))
    except MlflowException as e:
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise RegistryError(f"registered model '{name}' has no {what} in {cfg.mlflow_uri}: "
                            "list versions with `clipline compare`") from e


def download_checkpoint(cfg: Config, run_id: str, label: str) -> Path:
    """The run's ``checkpoint/`` artifacts, downloaded once into ``<data_dir>/models/<label>``."""
    import mlflow

    dst = cfg.data_dir / "models" / label
    local = dst / "checkpoint"
    if (local / "open_clip_config.json").is_file():
        return local
    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(dst),
                                                   tracking_uri=cfg.mlflow_uri)
    except Exception as e:  # noqa: BLE001 - mlflow raises several types; say which run
        raise RegistryError(f"run {run_id} has no 'checkpoint/' artifacts ({e}): it was not logged by `clipline train`") from e
    return Path(path)


def latest_checkpoint(cfg: Config) -> Path | None:
    """The most recently written checkpoint directory under ``cfg.checkpoints_dir``."""
    if not cfg.checkpoints_dir.is_dir():
        return None
    found = sorted((p for p in cfg.checkpoints_dir.rglob("open_clip_config.json")
                    if not any(part.startswith(".") for part in p.relative_to(cfg.checkpoints_dir).parts)),
                   key=lambda p: p.stat().st_mtime)  # hidden dirs are checkpoints still being written
    return found[-1].parent if found else None


def resolve_model(cfg: Config, ref: str | Path | None) -> ResolvedModel:
    """Resolve a checkpoint path, ``models:/NAME/N``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID``, a
    version number or an alias of ``cfg.tracking.registered_model``; None means the champion,
    else the newest local checkpoint."""
    from clipline.components.evaluate.checkpoint import read_meta

    if ref is None:
        if current_alias(cfg, CHAMPION) is not None:
            return resolve_model(cfg, CHAMPION)
        ckpt = latest_checkpoint(cfg)
        if ckpt is None:
            raise RegistryError(f"no model given, no '{CHAMPION}' in {cfg.mlflow_uri} and no checkpoint under "
                                f"{cfg.checkpoints_dir}: train one or pass --model")
        ref = ckpt
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        meta = read_meta(path)
        return ResolvedModel(text, path.resolve(), run_id=meta.get("run_id"), snapshot_id=meta.get("snapshot_id"))
    if text.startswith("runs:/"):
        run_id = text.removeprefix("runs:/").split("/")[0]
        ckpt = download_checkpoint(cfg, run_id, f"run-{run_id}")
        return ResolvedModel(text, ckpt, run_id=run_id, snapshot_id=read_meta(ckpt).get("snapshot_id"))
    m = _MODELS_URI.match(text)
    if m:
        name, version, alias = m["name"], m["version"], m["alias"]
    elif text.isdigit():
        name, version, alias = cfg.tracking.registered_model, text, None
    elif re.fullmatch(r"[A-Za-z][\w\-]*", text):
        name, version, alias = cfg.tracking.registered_model, None, text
    else:
        raise RegistryError(f"model '{text}' is not a path, a version number, an alias or a models:/ URI")
    mv = _version_for(cfg, name, version, alias)
    if not mv.run_id:
        raise RegistryError(f"model version {name}/{mv.version} has no run: its checkpoint cannot be found")
    ckpt = download_checkpoint(cfg, mv.run_id, f"{name}-v{mv.version}")
    snap = (mv.tags or {}).get("snapshot_id") or read_meta(ckpt).get("snapshot_id")
    return ResolvedModel(text, ckpt, run_id=mv.run_id, version=str(mv.version), snapshot_id=snap or None)


def model_uri_for_run(cfg: Config, run_id: str) -> str:
    """The URI of the model the train stage logged in ``run_id`` (``log_model(name="model")``):
    ``models:/<model_id>`` when MLflow 3 knows it, else ``runs:/<run_id>/model``."""
    import mlflow

    c = client(cfg)
    exp_id = c.get_run(run_id).info.experiment_id
    try:
        found = mlflow.search_logged_models(experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}'",
                                            output_format="list")
    except Exception:  # noqa: BLE001 - older stores without logged models
        found = []
    named = [m for m in found if m.name == "model"] or list(found)
    if named:
        return f"models:/{named[0].model_id}"
    return f"runs:/{run_id}/model"
