"""Thin Ray Train wrapper: the same ``run_loop`` inside a ``TorchTrainer`` (Ray Train V2).

ScalingConfig comes from the train config (workers, GPU per worker); the torch backend is NCCL on
GPU and gloo on CPU. Each checkpoint the loop writes is reported with ``ray.train.report`` so that a
worker failure is restarted by ``FailureConfig`` from the last reported checkpoint
(``ray.train.get_checkpoint()``). MLflow logging happens on rank 0 inside the loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipline.components.cluster import alive_nodes, connect_ray
from clipline.components.train.loop import LoopSpec, LoopSummary


def _train_func(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from clipline.components.train.loop import WorkerContext, run_loop

    spec: LoopSpec = config["spec"]
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = "cpu"
    if torch.cuda.is_available() and config.get("use_gpu"):
        local = tctx.get_local_rank()
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    from contextlib import nullcontext

    restored = ray.train.get_checkpoint()
    # as_directory() reads a checkpoint on local/shared storage in place (to_directory() would have
    # the ranks of one node re-download into one temp dir while another rank reads it).
    restored_dir = restored.as_directory() if restored is not None else nullcontext(None)

    def on_checkpoint(metrics: dict[str, float], path: Path | None) -> None:
        ck = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=path.name if path is not None else None)

    with restored_dir as d:
        summary = run_loop(
            spec,
            WorkerContext(
                rank=rank,
                world_size=world,
                device=device,
                feed="ray" if config.get("ray_data") else "torch",
                on_checkpoint=on_checkpoint,
                resume_from=Path(d) if d else None,
            ),
        )
    if summary is not None:
        Path(spec.run_dir / "summary.json").write_text(json.dumps(summary.__dict__, default=str))


def resolve_use_gpu(setting: str, workers: int) -> bool:
    """``train.use_gpu`` on Ray: "yes"/"no" as said; "auto" = GPUs when the cluster has one per
    worker right now (``ray.cluster_resources()``), as the driver of a cluster usually has none
    itself. An autoscaling cluster whose GPU nodes are not up yet reads as having none: set "yes"
    there, and Ray starts them."""
    if setting != "auto":
        return setting == "yes"
    import ray

    connect_ray()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if 0 < gpus < workers:
        import warnings

        warnings.warn(
            f"the Ray cluster has {gpus:g} GPU(s) for {workers} train workers: training on CPUs; "
            "lower train.workers to the GPU count or set train.use_gpu = 'yes' to wait for more"
        )
    return gpus >= workers > 0


def resolve_data_feed(setting: str) -> bool:
    """``train.data_feed`` on Ray: True for the Ray Data feed. "ray"/"torch" as said; "auto" = Ray
    Data when the cluster has more than one node (the trainers' nodes need not hold the data, and
    decoding runs wherever there are CPUs), else the torch feed."""
    if setting != "auto":
        return setting == "ray"
    return alive_nodes() > 1


def run_with_ray(
    spec: LoopSpec,
    workers: int,
    use_gpu: bool,
    max_failures: int,
    storage_path: Path,
    threads: int = 0,
    ray_data: bool = False,
) -> LoopSummary:
    """Run the loop on ``workers`` Ray Train workers; returns rank 0's summary.

    Connects to ``RAY_ADDRESS`` when set, else starts (or reuses) a local Ray. Raises the workers'
    error when a run fails more than ``max_failures`` times.
    """
    import json

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect_ray()
    storage_path.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _train_func,
        train_loop_config={"spec": spec, "threads": threads, "use_gpu": use_gpu, "ray_data": ray_data},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=str(storage_path.resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train["keep_checkpoints"]),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary = json.loads((spec.run_dir / "summary.json").read_text())
    return LoopSummary(**summary)
