"""What every flow run over a data dir obeys, whoever starts it (`clipline run`, `refresh`, a served
deployment): one run at a time per data dir (``lock``), and the bounds the serving process puts on
a served run's parameters (``params``)."""

from clipline.components.orchestration.lock import RUN_LOCK, RunBusy, exclusive_run, holder_name

__all__ = ["RUN_LOCK", "RunBusy", "exclusive_run", "holder_name"]
