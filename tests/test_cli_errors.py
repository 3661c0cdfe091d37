"""A command whose Prefect flow fails prints one line, not Prefect's tracebacks first, and Prefect
still records the failure. Through the real `clipline` process, against the session's Prefect
test server (so the run can be read back from its API)."""

from __future__ import annotations

import pytest
import re
from pathlib import Path

from tests.pipelinekit import base_env, clipline

# failure reports (Prefect's included), not the run's own counts such as "2 failed"
_ERRORISH = re.compile(r"error|exception|traceback|crashed|state failed", re.IGNORECASE)


def _flow_run_of(api_url: str, flow_name: str, data_dir: str):
    """The flow run of ``flow_name`` whose config names ``data_dir`` (the harness is shared)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from tests.pipelinekit import prefect_call

    async def read(c):
        return await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), limit=200)

    runs = [r for r in prefect_call(api_url, read) if data_dir in str(r.parameters)]
    assert len(runs) == 1, [r.parameters for r in runs]
    return runs[0]


def _logs_of(api_url: str, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.pipelinekit import prefect_call

    async def read(c):
        return await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in prefect_call(api_url, read)]


def _refresh_with_a_blocked_inbox(data: Path, env: dict[str, str], cwd: Path):
    """`clipline refresh` whose inbox cannot be created (a file stands where its parent folder
    should be): the `refresh` flow fails inside, after taking the run lock."""
    blocker = cwd / "not-a-folder"
    blocker.write_text("a file, not a folder\n")
    args = ["--data-dir", str(data), "refresh", "--inbox", str(blocker / "inbox")]
    return clipline(args, env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_a_failing_flow_prints_one_line_and_prefect_records_the_failure(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    env = base_env(PREFECT_API_URL=api)
    data = tmp_path / "data"

    res = _refresh_with_a_blocked_inbox(data, env, tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    output = res.stdout + res.stderr
    assert "Traceback" not in output, output[-3000:]
    reasons = [line for line in output.splitlines() if _ERRORISH.search(line)]
    assert reasons == [res.stderr.strip().splitlines()[-1]], output[-3000:]
    assert reasons[0].startswith("error: cannot create the inbox") and "set refresh.inbox" in reasons[0], reasons

    # the failure is where Prefect keeps it: a Failed flow run whose logs hold the traceback
    fr = _flow_run_of(api, "refresh", str(data))
    assert fr.state.is_failed(), fr.state
    assert "cannot create the inbox" in (fr.state.message or "")
    logs = _logs_of(api, fr.id)
    assert any("Traceback" in m and "InboxError" in m for m in logs), logs

    # CLIPLINE_DEBUG=1: the tracebacks are shown
    res = _refresh_with_a_blocked_inbox(tmp_path / "again", {**env, "CLIPLINE_DEBUG": "1"}, tmp_path)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "InboxError" in res.stderr, res.stderr[-3000:]
