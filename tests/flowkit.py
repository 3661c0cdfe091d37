"""Test helper: run a Prefect flow and read back the artifact that run published."""

from __future__ import annotations


def run_flow_with_artifact(flow, key: str, *args, **kwargs):
    """Run a Prefect flow and return (its result, the markdown of the artifact `key` that this
    flow run published). The harness is shared by the whole session, so artifacts are looked up
    by this run's id, never by "the first one with that key"."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    state = flow(*args, return_state=True, **kwargs)
    result = state.result()
    run_id = state.state_details.flow_run_id

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
                )
            )

    arts = asyncio.run(read())
    assert len(arts) == 1, f"flow run {run_id} published {len(arts)} artifacts with key {key!r}"
    return result, arts[0].data
