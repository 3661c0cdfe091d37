"""The model registry: one registered model, a new version per trained model, and the promotion rule.

Promotion rule (``decide_promotion``): a new version becomes ``champion`` when there is no
champion yet, or when its primary metric is strictly greater than the current champion's value
plus ``cfg.evaluate.promotion_margin``. Otherwise it gets the ``challenger`` alias. The primary
metric is ``cfg.evaluate.primary_metric`` (for example ``zeroshot/heldout/acc1``: a metric on a
chosen eval set); its default, ``auto``, is the top-1 accuracy on the first zero-shot set the
candidate was evaluated on, else its text-to-image recall@5 on the snapshot's val split
(``primary_metric_for``). A champion without the metric is replaced. A candidate without the
metric stops registration with a ``RegistryError`` (nothing is registered): no decision can be
made. The decision, its reason and both numbers are logged into the candidate's run (tags
``promotion.*``, metrics ``promotion/candidate`` and ``promotion/champion``) and set as tags on
the model version; the version's description sums up the primary metric, snapshot, parent
version and training recipe, and its model carries a signature (``clip_signature``).

A checkpoint whose training run is not in this tracking store (``adopt_checkpoint``) is logged
into a new run of this store, tagged with where it came from, and registered like any version.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipline.components.config import Config
from clipline.components.model.checkpoint import CONFIG_FILE, load_checkpoint, read_meta
from clipline.components.tracking.runs import client, code_version, config_hash, log_metrics

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
AUTO = "auto"


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


def decide_promotion(
    candidate: float | None, champion: float | None, margin: float, metric: str, champion_version: str | None = None
) -> PromotionDecision:
    """The documented rule (see the module docstring), as a pure function. A candidate without the
    metric cannot be compared: RegistryError."""
    if candidate is None:
        raise RegistryError(f"the candidate has no '{metric}' metric: the promotion rule cannot compare it")
    if champion_version is None:
        return PromotionDecision(True, metric, candidate, None, None, margin, "no champion yet")
    if champion is None:
        return PromotionDecision(
            True,
            metric,
            candidate,
            None,
            champion_version,
            margin,
            f"champion v{champion_version} has no '{metric}' metric",
        )
    if candidate > champion + margin:
        return PromotionDecision(
            True,
            metric,
            candidate,
            champion,
            champion_version,
            margin,
            f"{candidate:.4f} > champion {champion:.4f} + margin {margin:g}",
        )
    return PromotionDecision(
        False,
        metric,
        candidate,
        champion,
        champion_version,
        margin,
        f"{candidate:.4f} <= champion {champion:.4f} + margin {margin:g}",
    )


def primary_metric_for(cfg: Config, metrics: Mapping[str, float], zeroshot_sets: Sequence[str] | None = None) -> str:
    """The metric the promotion rule compares for a candidate evaluated into ``metrics``.

    ``cfg.evaluate.primary_metric`` unless it is ``auto``; then ``zeroshot/<set>/acc1`` of the first
    zero-shot set evaluated (``zeroshot_sets`` in evaluation order, else the order of ``metrics``),
    else ``retrieval/val/text_to_image_R5`` (the smallest k evaluated when 5 was not). Raises
    RegistryError when ``auto`` finds neither."""
    name = cfg.evaluate.primary_metric
    if name != AUTO:
        return name
    sets = (
        list(zeroshot_sets)
        if zeroshot_sets is not None
        else [
            k.split("/")[1] for k in metrics if k.startswith("zeroshot/") and k.endswith("/acc1") and k.count("/") == 2
        ]
    )
    for s in sets:
        if f"zeroshot/{s}/acc1" in metrics:
            return f"zeroshot/{s}/acc1"
    recall = sorted(
        (int(m["k"]), k) for k in metrics if (m := re.fullmatch(r"retrieval/val/text_to_image_R(?P<k>\d+)", k))
    )
    if recall:
        return next((k for n, k in recall if n == 5), recall[0][1])
    raise RegistryError(
        "evaluate.primary_metric is 'auto' but the evaluation measured no zero-shot top-1 and no "
        "retrieval recall: evaluate on a zero-shot set (--dataset or evaluate.datasets) or on a "
        "snapshot's val split (--snapshot), or set evaluate.primary_metric"
    )


def current_alias(cfg: Config, alias: str) -> Any | None:
    """The model version holding ``alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client(cfg).get_model_version_by_alias(cfg.tracking.registered_model, alias)
    except MlflowException:
        return None


def run_metric(cfg: Config, run_id: str | None, metric: str) -> float | None:
    """The latest value of ``metric`` in a run, or None (also when there is no run)."""
    if not run_id:
        return None
    return client(cfg).get_run(run_id).data.metrics.get(metric)


def run_exists(cfg: Config, run_id: str) -> bool:
    """Whether ``run_id`` is a run of this tracking store (False for a run of another store)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client(cfg).get_run(run_id)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise
    return True


def _measured(metrics: Mapping[str, float]) -> str:
    """The headline metrics a candidate has, for an error message."""
    names = [k for k in metrics if k.endswith("/acc1") or re.search(r"_R\d+$", k)]
    if not names:
        return "no zero-shot or retrieval metric"
    return "it has " + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def plan_promotion(
    cfg: Config, metrics: Mapping[str, float], run_id: str | None = None, zeroshot_sets: Sequence[str] | None = None
) -> PromotionDecision:
    """The promotion decision for a candidate evaluated into ``metrics`` (its run's logged metrics
    fill in a missing primary one), made before anything is registered. RegistryError when the
    candidate lacks the primary metric: the message says which metric and what to do."""
    primary = primary_metric_for(cfg, metrics, zeroshot_sets)
    champion_mv = current_alias(cfg, CHAMPION)
    champion_value = run_metric(cfg, champion_mv.run_id, primary) if champion_mv is not None else None
    candidate_value = metrics.get(primary)
    if candidate_value is None:
        candidate_value = run_metric(cfg, run_id, primary)
    if candidate_value is None:
        has = _measured(metrics)
        if champion_mv is None:
            why = f"this model has no '{primary}' metric ({has}) and there is no champion to compare with"
        elif champion_value is None:
            why = f"neither this model ({has}) nor champion v{champion_mv.version} has the metric '{primary}'"
        else:
            why = (
                f"this model has no '{primary}' metric ({has}), so it cannot be compared with champion "
                f"v{champion_mv.version} ({champion_value:.4f})"
            )
        raise RegistryError(
            f"cannot register: {why}; evaluate on the zero-shot set that evaluate.primary_metric "
            f"names, or set evaluate.primary_metric to a metric the evaluation measures (or to "
            f"'{AUTO}')"
        )
    return decide_promotion(
        candidate_value,
        champion_value,
        cfg.evaluate.promotion_margin,
        primary,
        champion_version=str(champion_mv.version) if champion_mv is not None else None,
    )


def register_and_promote(
    cfg: Config,
    run_id: str,
    model_uri: str,
    metrics: Mapping[str, float],
    snapshot_id: str | None,
    parent_version: str | None = None,
    zeroshot_sets: Sequence[str] | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> RegistryResult:
    """Register ``model_uri`` as a new version of ``cfg.tracking.registered_model`` and set its alias.

    Tags on the version: ``snapshot_id``, ``parent_version`` (when fine-tuned), ``config_hash``,
    ``code_version``, ``run_id``, ``extra_tags``, and the promotion decision; a description (see
    ``version_description``); the model gets a signature when it was logged without one.
    ``metrics`` are the candidate's evaluation metrics (they are also looked up in the run when the
    primary one is missing); ``zeroshot_sets`` the zero-shot sets in evaluation order (for the
    ``auto`` primary metric). Raises RegistryError, registering nothing, when no decision can be made.
    """
    import mlflow

    c = client(cfg)
    name = cfg.tracking.registered_model
    decision = plan_promotion(cfg, metrics, run_id, zeroshot_sets)
    primary, candidate_value, champion_value = decision.metric, decision.candidate_value, decision.champion_value

    ensure_signature(cfg, model_uri)
    tags = {
        "snapshot_id": snapshot_id or "",
        "config_hash": config_hash(cfg),
        "code_version": code_version(),
        "run_id": run_id,
        **dict(extra_tags or {}),
    }
    if parent_version:
        tags["parent_version"] = str(parent_version)
    mv = mlflow.register_model(model_uri, name, tags=tags)
    version = str(mv.version)

    alias = CHAMPION if decision.promote else CHALLENGER
    c.set_registered_model_alias(name, alias, version)
    if decision.promote and decision.champion_version is not None and decision.champion_version != version:
        c.set_model_version_tag(name, decision.champion_version, "replaced_by", version)

    # log the decision and both numbers, on the version and in the run
    vtags = {
        "promotion.decision": alias,
        "promotion.reason": decision.reason,
        "promotion.metric": primary,
        "promotion.margin": f"{decision.margin:g}",
        "promotion.champion_version": decision.champion_version or "",
    }
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
    run = c.get_run(run_id)
    c.update_model_version(
        name,
        version,
        description=version_description(
            decision, alias, snapshot_id, parent_version, run.data.params, extra_tags or {}
        ),
    )
    return RegistryResult(
        name=name, version=version, alias=alias, decision=decision, model_uri=model_uri, run_id=run_id
    )


# ----- what the registry page shows: description and signature -----


def training_recipe(params: Mapping[str, str]) -> str | None:
    """One line from a train run's parameters (``train.*``, ``total_steps``, ``pretrained``), or None."""
    model = params.get("train.model")
    if not model:
        return None
    steps = params.get("total_steps") or params.get("train.steps")
    parts = [model]
    if steps and steps != "0":
        parts.append(f"{steps} steps")
    elif params.get("train.epochs"):
        parts.append(f"{params['train.epochs']} epochs")
    for key, label in (("train.batch_size", "batch"), ("train.lr", "lr")):
        if params.get(key):
            parts.append(f"{label} {params[key]}")
    if params.get("train.workers") and params["train.workers"] != "1":
        parts.append(f"{params['train.workers']} workers")
    if params.get("pretrained"):
        parts.append(f"from {params['pretrained']}")
    if params.get("wise_ft_alpha"):
        parts.append(f"WiSE-FT blend with the start, alpha {params['wise_ft_alpha']}")
    return ", ".join(parts)


def version_description(
    decision: PromotionDecision,
    alias: str,
    snapshot_id: str | None,
    parent_version: str | None,
    params: Mapping[str, str],
    extra_tags: Mapping[str, str],
) -> str:
    """The model version's description (Markdown): primary metric and decision, snapshot, parent
    version, training recipe, and where an outside checkpoint came from."""
    d = decision
    champ = "" if d.champion_value is None else f" (champion v{d.champion_version}: {d.champion_value:.4f})"
    lines = [
        f"- **{d.metric}**: {d.candidate_value:.4f}{champ} -> **{alias}**: {d.reason}",
        f"- snapshot: {snapshot_id or 'none recorded'}",
        f"- parent version: {'v' + str(parent_version) if parent_version else 'none (trained from scratch)'}",
        f"- training recipe: {training_recipe(params) or 'not recorded in its run'}",
    ]
    if extra_tags.get("source_checkpoint"):
        src = f"- evaluated from checkpoint `{extra_tags['source_checkpoint']}`"
        if extra_tags.get("source_run_id"):
            src += f", trained in run {extra_tags['source_run_id']} of another tracking store"
        lines.append(src)
    lines.append(
        "- load: `mlflow.pytorch.load_model(uri)` gives the open_clip model; its signature is `model(image, text)`"
    )
    return "\n".join(lines)


def ensure_signature(cfg: Config, model_uri: str) -> None:
    """Give the logged model at ``model_uri`` a signature when it was logged without one (models
    logged before signatures were written, or by other code)."""
    import mlflow
    from mlflow.models import get_model_info, set_signature

    from clipline.components.tracking.signature import clip_signature

    client(cfg)
    try:
        if get_model_info(model_uri).signature is not None:
            return
    except Exception:  # noqa: BLE001 - no MLmodel there: register_model reports it
        return
    try:
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        set_signature(model_uri, clip_signature(model))
    except Exception as e:  # noqa: BLE001 - a nicety: never block registration on it
        log.warning("model %s keeps no signature: %s: %s", model_uri, type(e).__name__, e)


# ----- a checkpoint from elsewhere -----


def adopt_checkpoint(
    cfg: Config, checkpoint_dir: Path, source_run_id: str | None = None
) -> tuple[str, str, dict[str, str]]:
    """Log a checkpoint whose training run is not in this store into a new run of this store's
    experiment: its files under ``checkpoint/``, its model as ``model`` (with a signature), its
    recorded training settings as ``train.*`` parameters, and tags saying where it came from.
    Returns (run_id, model_uri, source tags for the model version)."""
    import mlflow

    from clipline.components.tracking.runs import ensure_experiment, log_checkpoint

    checkpoint_dir = Path(checkpoint_dir).resolve()
    meta = read_meta(checkpoint_dir)
    source = {"source_checkpoint": str(checkpoint_dir)}
    if source_run_id:
        source["source_run_id"] = source_run_id
    tags = {
        "stage": "evaluate",
        "clipline.source": "outside checkpoint",
        **{f"clipline.{k}": v for k, v in source.items()},
    }
    if meta.get("snapshot_id"):
        tags["snapshot_id"] = str(meta["snapshot_id"])
    if meta.get("model_name"):
        tags["model_name"] = str(meta["model_name"])
    if meta.get("exported_from"):
        tags["clipline.exported_from"] = str(meta["exported_from"])
    params = {
        f"train.{k}": str(v)[:500]
        for k, v in (meta.get("train") or {}).items()
        if isinstance(v, (str, int, float, bool)) or v is None
    }
    model = load_checkpoint(checkpoint_dir, "cpu").model
    client(cfg)
    exp_id = ensure_experiment(cfg)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"outside {checkpoint_dir.name}", tags=tags) as run:
        if params:
            mlflow.log_params(params)
        uri = log_checkpoint(checkpoint_dir, model, meta.get("snapshot_id"))
        return run.info.run_id, uri, source


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
        raise RegistryError(
            f"registered model '{name}' has no {what} in {cfg.mlflow_uri}: list versions with `clipline compare`"
        ) from e


def download_checkpoint(cfg: Config, run_id: str, label: str) -> Path:
    """The run's ``checkpoint/`` artifacts, downloaded once into ``<data_dir>/models/<label>``."""
    import mlflow

    dst = cfg.data_dir / "models" / label
    local = dst / "checkpoint"
    if (local / CONFIG_FILE).is_file():
        return local
    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoint", dst_path=str(dst), tracking_uri=cfg.mlflow_uri
        )
    except Exception as e:  # noqa: BLE001 - mlflow raises several types; say which run
        raise RegistryError(
            f"run {run_id} has no 'checkpoint/' artifacts ({e}): it was not logged by `clipline train`"
        ) from e
    return Path(path)


def latest_checkpoint(cfg: Config) -> Path | None:
    """The most recently written checkpoint directory under ``cfg.checkpoints_dir``."""
    if not cfg.checkpoints_dir.is_dir():
        return None
    found = sorted(
        (
            p
            for p in cfg.checkpoints_dir.rglob(CONFIG_FILE)
            if not any(part.startswith(".") for part in p.relative_to(cfg.checkpoints_dir).parts)
        ),
        key=lambda p: p.stat().st_mtime,
    )  # hidden dirs are checkpoints still being written
    return found[-1].parent if found else None


def resolve_model(cfg: Config, ref: str | Path | None) -> ResolvedModel:
    """Resolve a checkpoint path, ``models:/NAME/N``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID``, a
    version number or an alias of ``cfg.tracking.registered_model``, or hub weights
    (``hf-hub:org/repo``, ``MODEL:TAG``, a tag of ``train.model``: see ``model/start.py``); None
    means the champion, else the newest local checkpoint."""
    if ref is None:
        if current_alias(cfg, CHAMPION) is not None:
            return resolve_model(cfg, CHAMPION)
        ckpt = latest_checkpoint(cfg)
        if ckpt is None:
            raise RegistryError(
                f"no model given, no '{CHAMPION}' in {cfg.mlflow_uri} and no checkpoint under "
                f"{cfg.checkpoints_dir}: train one or pass --model"
            )
        ref = ckpt
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        meta = read_meta(path)
        return ResolvedModel(text, path.resolve(), run_id=meta.get("run_id"), snapshot_id=meta.get("snapshot_id"))
    from clipline.components.model import start

    if start.is_hub_reference(text, cfg.train.model):  # hub weights, written out as a checkpoint once
        hub = start.resolve(text, cfg.train.model)
        ckpt = start.as_checkpoint(hub, cfg.checkpoints_dir / "_hub" / re.sub(r"[^\w.-]+", "-", text))
        return ResolvedModel(text, ckpt)
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
        found = mlflow.search_logged_models(
            experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
        )
    except Exception:  # noqa: BLE001 - older stores without logged models
        found = []
    named = [m for m in found if m.name == "model"] or list(found)
    if named:
        return f"models:/{named[0].model_id}"
    return f"runs:/{run_id}/model"
