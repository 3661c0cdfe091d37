"""Prefect flow `train`: snapshot -> checkpoint + MLflow run, with a markdown artifact of the run."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from clipline.components.config import Config
from clipline.components.train.run import TrainResult, train


def train_report_markdown(r: TrainResult) -> str:
    return "\n".join(
        [
            "## Train",
            "",
            "| | |",
            "|---|---|",
            f"| model | {r.model_name} |",
            f"| snapshot | {r.snapshot_id} |",
            f"| steps | {r.steps} |",
            f"| final loss | {r.final_loss:.4f} |",
            f"| throughput | {r.samples_per_s:.1f} samples/s |",
            f"| training time | {r.train_seconds:.1f} s |",
            f"| checkpoint | `{r.checkpoint_dir}` |",
            f"| MLflow run | `{r.run_id}` |",
            f"| logged model | `{r.model_uri}` |",
        ]
        + (
            [f"| WiSE-FT {r.wise_ft.alpha:g} blend | `{r.wise_ft.checkpoint_dir}` (run `{r.wise_ft.run_id}`) |"]
            if r.wise_ft
            else []
        )
    )


@flow(name="train", log_prints=True)
def train_flow(cfg: Config, snapshot_id: str | None = None, from_model: Path | str | None = None) -> TrainResult:
    """Train on a snapshot (the latest when None), optionally fine-tuning from a start (a checkpoint,
    or hub weights: see ``clipline.components.model.start``)."""
    logger = get_run_logger()
    result = train(cfg, snapshot_id=snapshot_id, from_model=from_model)
    logger.info(
        "train: %s on %s, %d steps, loss %.4f, %.1f samples/s, checkpoint %s",
        result.model_name,
        result.snapshot_id,
        result.steps,
        result.final_loss,
        result.samples_per_s,
        result.checkpoint_dir,
    )
    if result.wise_ft is not None:
        logger.info("train: WiSE-FT %g blend with the start: %s", result.wise_ft.alpha, result.wise_ft.checkpoint_dir)
    create_markdown_artifact(
        markdown=train_report_markdown(result), key="train-report", description="clipline train run"
    )
    return result
