"""One typed configuration for every stage.

Sources, lowest to highest priority:
  1. defaults below;
  2. a TOML file (``--config FILE``, default ``./clipline.toml`` when present), with one table per
     section: ``[ingest]``, ``[curate]``, ...;
  3. environment variables ``CLIPLINE_<SECTION>__<FIELD>`` (for example
     ``CLIPLINE_INGEST__IMAGE_SIZE=224``), ``CLIPLINE_DATA_DIR`` and ``CLIPLINE_STATE_DIR``;
  4. command-line flags (passed as ``overrides``).

Any invalid value raises :class:`ConfigError`, whose message names the field, the value and the
source to fix.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = Path("clipline.toml")


class ConfigError(ValueError):
    """An invalid configuration value; the message says which and where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(_Section):
    # URL-list reading (img2dataset's option names where they exist)
    url_col: str = "url"
    caption_col: str = "caption"
    input_format: Literal["auto", "csv", "tsv", "parquet", "jsonl", "txt"] = "auto"
    save_additional_columns: bool | list[str] = Field(
        True, description="carry the URL list's other columns: all (true), none (false) or these names"
    )
    # image processing
    image_size: int = Field(256, ge=8, le=8192)
    resize_mode: Literal["no", "center_crop", "keep_ratio", "border"] = "border"
    encode_format: Literal["jpg", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    max_image_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit (width*height)")
    # downloading
    concurrency: int = Field(128, ge=1, le=4096)
    per_host_concurrency: int = Field(64, ge=1)
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(10.0, gt=0)
    total_timeout: float = Field(30.0, gt=0, description="deadline for one download, all retries included")
    retries: int = Field(2, ge=0, le=20)
    backoff_base: float = Field(0.5, ge=0)
    max_retry_after: float = Field(30.0, ge=0, description="longest Retry-After honoured (s)")
    max_bytes: int = Field(20_000_000, ge=1024, description="largest response body accepted")
    max_redirects: int = Field(5, ge=0)
    user_agent: str = "clipline/0.1 (+https://github.com/clipline/clipline; image-text dataset research)"
    respect_optout: bool = True
    allow_hosts: list[str] = Field(default_factory=list, description="HOST:PORT exempt from the SSRF guard")
    ssrf_guard: bool = Field(True, description="refuse loopback/private/link-local/... destinations (keep on)")
    dns_cache_ttl: float = Field(60.0, gt=0, description="seconds a DNS answer is reused")

    @field_validator("allow_hosts")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        import re

        for item in v:
            if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):([0-9]{1,5})", item.strip()) or not (
                0 < int(item.strip().rsplit(":", 1)[1]) < 65536
            ):
                raise ValueError(f"{item!r} is not HOST:PORT (for example 127.0.0.1:8123 or [::1]:8123)")
        return v

    # output
    shard_size: int = Field(1000, ge=1, description="URLs per raw shard")
    processes: int = Field(0, ge=0, description="image-processing worker processes (0 = one per core)")
    retry_failed: bool = False


class CurateConfig(_Section):
    rules_file: Path | None = Field(
        None, description="an edited copy of the packaged rules.sql (default: the packaged one)"
    )
    # caption rules (DataComp's basic filter: more than 2 words, more than 5 characters)
    min_caption_words: int = Field(3, ge=0, description="keep captions with at least this many words (DataComp: >2)")
    min_caption_chars: int = Field(
        6, ge=0, description="keep captions with at least this many characters (DataComp: >5)"
    )
    max_caption_chars: int = Field(1000, ge=1)
    blocklist_file: Path | None = Field(
        None, description="one term per line ('#' comments); default: the packaged list"
    )
    language: str | None = Field("en", description="ISO 639-1 code to keep; empty/None switches the rule off")
    language_min_confidence: float = Field(
        0.9,
        ge=0,
        le=1,
        description="drop a caption only when langid names another language with at least this probability",
    )
    # image rules (DataComp: 200 px shorter side of the original)
    min_image_side: int = Field(200, ge=0, description="shorter side of the original image, px")
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    # deduplication
    exact_image_dedup: Literal["image", "image_and_caption"] = Field(
        "image",
        description="image: one row per stored-image sha256; image_and_caption: only when the caption is the same too",
    )
    phash_max_distance: int = Field(
        6, ge=-1, le=32, description="near-duplicate image distance in bits of 64; -1 switches it off"
    )
    caption_near_dedup: bool = False
    caption_minhash_threshold: float = Field(0.8, gt=0, le=1)
    caption_minhash_perm: int = Field(64, ge=16, le=512)
    caption_shingle_chars: int = Field(5, ge=1, le=32)
    eval_set: Path | None = None
    # CLIP-score filtering (DataComp's CLIP score filter): off unless a threshold or a kept share is set
    clip_score_threshold: float | None = Field(
        None, ge=-1, le=1, description="drop new rows whose image-caption cosine similarity is below this"
    )
    clip_score_keep_fraction: float | None = Field(
        None, gt=0, le=1, description="keep this share of the new rows, the highest-scored (DataComp: 0.3)"
    )
    clip_score_model: str = Field(
        "champion",
        description="the scoring model: a registered version or alias, a checkpoint dir, hf-hub:org/repo or "
        "MODEL:TAG; with 'champion' and no champion yet, the rule waits for one (skipped, and said)",
    )
    clip_score_batch_size: int = Field(256, ge=1)
    clip_score_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when there is one")

    @model_validator(mode="after")
    def _one_clip_score_form(self) -> "CurateConfig":
        if self.clip_score_threshold is not None and self.clip_score_keep_fraction is not None:
            raise ValueError("set clip_score_threshold or clip_score_keep_fraction, not both")
        return self

    # snapshot
    val_fraction: float = Field(0.05, ge=0, lt=1)
    row_group_rows: int = Field(
        4096, ge=2048, description="rows per Parquet row group (DuckDB writes multiples of 2048)"
    )
    file_size_mb: int = Field(512, ge=1, description="largest snapshot Parquet file before a new one starts")
    duckdb_memory_limit: str = "2GB"
    duckdb_temp_dir: Path | None = Field(None, description="spill directory (default <state-dir>/tmp/duckdb)")
    duckdb_threads: int = Field(2, ge=1)
    contact_sheet_examples: int = Field(4, ge=0, le=32, description="dropped examples shown per rule")


class TrainConfig(_Section):
    model: str = Field("clipline-tiny", description="a config in components/model/configs or an open_clip name")
    pretrained: Path | str | None = Field(
        None,
        description="where to start: a checkpoint dir or weights file, a registered version or alias, "
        "hf-hub:org/repo, or an open_clip pretrained tag of model (or MODEL:TAG)",
    )
    wise_ft_alpha: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="WiSE-FT: also write (1 - alpha) * start + alpha * fine-tuned, evaluated and registered as its "
        "own version (needs a start: pretrained or --from-model)",
    )
    recipe: str = Field(
        "auto",
        description="a preset of [train] values for the unset ones (components/train/recipes/*.toml): a name, "
        "auto (chosen by the model's parameter count) or none",
    )
    batch_size: int = Field(128, ge=2, description="global batch size (split evenly over workers)")
    steps: int = Field(0, ge=0, description="0 = derive from epochs")
    epochs: float = Field(5.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine schedule floor, as a share of lr")
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0, description="linear warmup, capped at 10% of the run's steps")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 switches clipping off")
    crop_scale_min: float = Field(
        0.5,
        gt=0,
        le=1,
        description="RandomResizedCrop's smallest area share; for a letterboxing model, the "
        "random zoom's range (1/sqrt .. sqrt of it)",
    )
    workers: int = Field(1, ge=1, description="Ray Train workers")
    backend: Literal["auto", "local", "ray"] = Field(
        "auto", description="auto: Ray Train when workers > 1 or RAY_ADDRESS is set, else in-process"
    )
    data_feed: Literal["auto", "torch", "ray"] = Field(
        "auto",
        description="how batches reach the trainers: torch (a DataLoader in each trainer process) or ray (read "
        "and decoded in Ray Data tasks, wherever the cluster has CPUs); both give the same batches. auto: ray on "
        "a Ray cluster of more than one node, else torch",
    )
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per trainer")
    threads: int = Field(0, ge=0, description="torch threads per trainer (0 = cores / trainers)")
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto", description="auto: on Ray, GPUs when the cluster has one per worker; else when this machine has one"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    grad_checkpointing: bool = False
    channels_last: bool = Field(True, description="channels-last image tower (faster convolutions)")
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1, description="flush per-step metrics to MLflow every N steps")
    system_metrics: bool = True
    max_failures: int = Field(2, ge=0)
    fail_at_step: int | None = Field(None, ge=1, description="testing: raise once at this step (failure injection)")
    run_name: str | None = Field(None, description="same name again = resume that run from its last checkpoint")


class EvaluateConfig(_Section):
    primary_metric: str = Field(
        "auto",
        min_length=1,
        description="metric the promotion rule compares, e.g. zeroshot/<set>/acc1; auto: top-1 on the first zero-shot "
        "set evaluated, else text-to-image R@5 on the snapshot's val split",
    )
    promotion_margin: float = Field(0.0, ge=0, description="a new version must beat the champion by more than this")
    batch_size: int = Field(256, ge=1)
    datasets: list[Path] = Field(
        default_factory=list, description="zero-shot sets (Parquet or ImageFolder) evaluated by default"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0, description="DataLoader workers decoding images")
    recall_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    retrieval_max_pairs: int = Field(5000, ge=1, description="val pairs used for retrieval (first N by key)")
    grid_queries: int = Field(4, ge=0, description="text queries shown in the retrieval grid PNG")
    grid_top: int = Field(4, ge=1, description="images per query in the retrieval grid PNG")
    worst_classes: int = Field(5, ge=1)
    compare_metrics: list[str] = Field(
        default_factory=list, description="metrics charted by `compare` (default: primary + acc1/R5)"
    )

    @field_validator("recall_k")
    @classmethod
    def _positive_k(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("recall_k must be a non-empty list of positive integers")
        return sorted(set(v))


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite in the data dir")
    experiment: str = "clipline"
    registered_model: str = "clipline"


class RefreshConfig(_Section):
    inbox: str = Field(
        "inbox", description="folder of new URL lists: a path (relative = under the data dir) or an fsspec URL"
    )
    archive: Literal["move", "keep"] = Field(
        "move", description="move: ingested lists go to <inbox>/done/; keep: leave them (read-only sources)"
    )
    cron: str = Field("0 3 * * *", description="schedule of the served `refresh` deployment")
    interval_s: float | None = Field(
        None, gt=0, description="run the served refresh every N seconds instead of on cron"
    )
    timezone: str = Field("UTC", description="time zone the cron schedule is read in")
    from_scratch: bool = Field(False, description="train each refresh from scratch instead of fine-tuning the champion")
    train_steps: int = Field(0, ge=0, description="optimiser steps of a fine-tune (0 = train.steps / train.epochs)")
    eval_sets: list[Path] = Field(
        default_factory=list, description="zero-shot sets a refresh evaluates on (default: evaluate.datasets)"
    )
    decontaminate: Path | None = Field(
        None, description="eval set whose near-duplicates curate drops (default: curate.eval_set)"
    )
    lock_wait_s: float = Field(
        0.0,
        ge=0,
        description="how long a pipeline/refresh run waits for another one on the same data dir (0: fail at once)",
    )
    pipeline_deployment: str = Field(
        "pipeline", description="deployment name of the pipeline flow under `clipline serve`"
    )
    refresh_deployment: str = Field("refresh", description="deployment name of the refresh flow under `clipline serve`")
    input_roots: list[str] = Field(
        default_factory=list,
        description="folders (or fsspec URL prefixes) inside which a run of a `clipline serve` deployment may name "
        "files to read (URL lists, eval sets, checkpoints); outside them, and when none is set, it may "
        "name none (clipline.components.orchestration.params)",
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        # the shape only; `clipline serve` checks the fields with Prefect's own cron parser
        if len(v.split()) not in (5, 6):
            raise ValueError(f"{v!r} is not a cron expression of 5 fields (for example '0 3 * * *': 03:00 every day)")
        return v


#: the toy web's faults (see clipline.components.demo.faults for what each one does)
DEMO_FAULTS: tuple[str, ...] = (
    "http_404",
    "http_500",
    "http_429",
    "http_503_retry_after",
    "slow",
    "timeout",
    "redirect",
    "redirect_internal",
    "truncated",
    "not_image",
    "oversized",
    "bomb",
    "cmyk",
    "palette",
    "alpha",
    "animated",
    "optout",
    "exact_duplicate",
    "near_duplicate",
    "caption_empty",
    "caption_junk",
    "caption_mojibake",
    "caption_foreign",
)


#: the demo's training recipe (DemoConfig.train), chosen for a 2-core CPU and a ~5 minute budget:
#: a two-stream image tower at 64 px (towers.py: a small CNN that sees form without hue beside a
#: pooled colour stream), letterboxed like the ingested images, and a one-layer text tower whose
#: attention averages the words (clipline-demo.json's init_cfg);
#: one torch thread, so that the DataLoader worker has the other core and a busy machine does not
#: make two OpenMP threads spin against each other. 1,500 steps, not fewer, so that an ordinary
#: architecture (clipline-rgb-cnn) swapped in also learns the pairings it saw (at 700 steps it reaches
#: 0.61-0.74 seen top-1, at 1,500 0.84-0.90; benchmarks/RESULTS.md). Measured by benchmarks/demo_time.py.
DEMO_TRAIN: dict[str, Any] = {
    "model": "clipline-demo",
    "batch_size": 64,
    "steps": 1500,
    "lr": 2e-3,
    "warmup_steps": 20,
    "crop_scale_min": 0.8,
    "threads": 1,
    "loader_workers": 1,
    "checkpoint_every": 1000,
}


class DemoConfig(_Section):
    seed: int = 0
    n_images: int = Field(3000, ge=10)
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="toy web port (0 = any free port)")
    internal_port: int = Field(0, ge=0, le=65535, description="port of the stand-in internal service (0 = any free)")
    fault_rate: float = Field(0.08, ge=0, le=1, description="share of URLs that carry a web fault")
    fault_weights: dict[str, float] = Field(
        default_factory=dict,
        description="relative weight of each fault within fault_rate (missing = 1.0, 0 = never)",
    )
    mismatch_share: float = Field(
        0.0,
        ge=0,
        le=0.9,
        description="share of clean URLs whose caption describes another picture (another colour x shape): "
        "the noise CLIP-score filtering removes",
    )
    small_image_share: float = Field(0.05, ge=0, le=1, description="share of images under 200 px on the short side")
    wide_image_share: float = Field(0.02, ge=0, le=1, description="share of banner-shaped images (aspect ratio > 3)")
    slow_seconds: float = Field(1.5, ge=0, description="delay of a 'slow' response")
    hang_seconds: float = Field(60.0, ge=0, description="how long a 'timeout' response hangs")
    oversized_bytes: int = Field(25_000_000, ge=1, description="body size of an 'oversized' response")
    bomb_side: int = Field(20_000, ge=1, description="declared width and height of the decompression bomb")
    warm_cache: bool = Field(True, description="render every image in a background thread at start")
    reuse_port: bool = Field(
        True,
        description="with port 0, serve on the port the last demo in this data dir used (same URLs, so a rerun "
        "fetches nothing new); a free port when that one is taken",
    )
    train: dict[str, Any] = Field(
        default_factory=lambda: dict(DEMO_TRAIN),
        description="the demo's training recipe: [train] settings used by `clipline demo` unless the [train] section "
        "or CLIPLINE_TRAIN__* sets them; a [demo.train] table changes the values it names",
    )

    @field_validator("train")
    @classmethod
    def _train_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(
                f"unknown train setting(s) {', '.join(unknown)}; known: {', '.join(TrainConfig.model_fields)}"
            )
        TrainConfig(**v)  # each value must be valid for its field
        return {**DEMO_TRAIN, **v}  # a [demo.train] table changes the recipe's values it names

    @field_validator("fault_weights")
    @classmethod
    def _known_faults(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(DEMO_FAULTS))
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(DEMO_FAULTS)}")
        negative = sorted(k for k, w in v.items() if w < 0)
        if negative:
            raise ValueError(f"fault weights must be >= 0: {', '.join(negative)}")
        return v

    def fault_weight(self, fault: str) -> float:
        return float(self.fault_weights.get(fault, 1.0))


class Config(BaseSettings):
    """Everything clipline reads; see the module docstring for where values come from."""

    model_config = SettingsConfigDict(
        env_prefix="CLIPLINE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    data_dir: Path = Path("clipline-data")
    state_dir: Path | None = Field(
        None,
        description="what must stay on a disk of this machine: the catalog (and its run lock), the default "
        "SQLite MLflow store, DuckDB's spill directory; default: the data dir",
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    @field_validator("data_dir", "state_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (CLI flags and the TOML file, merged in load_config) > environment
        return (init_settings, env_settings)

    # ----- derived locations (the data-dir and state-dir layouts) -----
    @property
    def state_root(self) -> Path:
        """Where local state lives: ``state_dir``, or the data dir when none is set."""
        return self.state_dir if self.state_dir is not None else self.data_dir

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def catalog_path(self) -> Path:
        return self.state_root / "catalog.duckdb"

    @property
    def mlflow_uri(self) -> str:
        import os

        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.state_root / 'mlflow.db').resolve()}"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        lines.append(f"{loc} = {value!r}: {e['msg']}")
    return f"invalid configuration ({source}): " + "; ".join(lines)


def load_config(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the config from file, environment and overrides (nested dicts, e.g. {"ingest": {...}}).

    ``config_file=None`` reads ``./clipline.toml`` when it exists. Raises ConfigError on any
    invalid value or unreadable file, naming it.
    """
    file_data: dict[str, Any] = {}
    source = "defaults and CLIPLINE_* environment"
    path = config_file if config_file is not None else (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist: give an existing TOML file to --config")
        try:
            file_data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        source = f"{path} and CLIPLINE_* environment"
    try:
        env_set = Config().model_dump(exclude_unset=True)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "CLIPLINE_* environment")) from e
    merged = _deep_merge(file_data, env_set)
    if overrides:
        merged = _deep_merge(merged, {k: v for k, v in overrides.items() if v is not None})
        source += " and command-line flags"
    try:
        return Config(**merged)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from e
