"""What the supervisor of ``--workers N`` answers: each worker's view, side by side."""

from datetime import datetime

from pydantic import BaseModel, Field

from schemas.api import FrameCounts, ModelStatus, PolicyState, Readiness, ScorerStatus
from service.workers.pool import Worker, WorkerPhase


class WorkerView(BaseModel):
    """One worker process as the supervisor sees it."""

    worker: int = Field(description="its index, 0 to N-1 (the `worker` label of /metrics)")
    pid: int | None
    phase: WorkerPhase
    restarts: int = Field(description="times it was started again after it exited")
    last_exit: int | None = Field(description="the exit status of its last process")
    problem: str | None = Field(default=None, description="why it was last stopped, if known")

    @classmethod
    def of(cls, worker: Worker) -> "WorkerView":
        return cls(
            worker=worker.index,
            pid=worker.pid,
            phase=worker.phase,
            restarts=worker.restarts,
            last_exit=worker.last_exit,
            problem=worker.problem,
        )


class WorkerReadiness(WorkerView):
    ready: bool
    model_loaded: bool
    partitions_assigned: int


class PoolReadiness(Readiness):
    """``GET /readyz``: ready only when every worker is."""

    workers: list[WorkerReadiness]


class WorkerStatus(WorkerView):
    status: ScorerStatus | None = Field(description="its own /v1/status; null: no answer")


class PoolStatus(BaseModel):
    """``GET /v1/status`` of a supervisor: the pool's totals and each worker's own status."""

    ready: bool
    started_at: datetime
    frames: FrameCounts = Field(description="the answering workers' counts, summed")
    partitions: list[str] = Field(description="the frames partitions the workers hold")
    model_versions: list[str] = Field(description="the model versions served (one when in step)")
    workers: list[WorkerStatus]


class WorkerPolicy(WorkerView):
    policy: PolicyState | None = Field(description="its policy; null: no answer")


class PoolPolicy(BaseModel):
    """``GET`` or ``PUT /v1/policy`` of a supervisor: each worker's policy."""

    workers: list[WorkerPolicy]


class WorkerModel(WorkerView):
    model: ModelStatus | None = Field(description="its model and releases; null: no answer")


class PoolModel(BaseModel):
    """``GET /v1/model`` (or a pin) of a supervisor: each worker's model."""

    workers: list[WorkerModel]
