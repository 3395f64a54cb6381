"""JSON bodies of the API (tensors travel as raw bytes or safetensors, never as JSON)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class WorkersSpec(BaseModel):
    """How the group's gradients from several workers combine (see service/workers.py)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["plain", "sync", "async"] = "plain"
    count: int | None = Field(
        None, description="sync: the members an iteration needs to start (default 1)"
    )
    timeout_s: float | None = Field(None, description="sync: straggler timeout (default 60)")
    lease_s: float | None = Field(
        None,
        description="sync: a member silent this long is dropped (default: no lease, a member "
        "stays until it leaves)",
    )
    clip_grad_norm: float | None = Field(
        None, description="sync: the max global norm of an iteration's averaged gradients"
    )
    max_staleness: int | None = Field(None, description="async: versions a gradient may lag")


class GroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: str = Field(examples=["adamw"])
    hyperparams: dict[str, Any] = Field(default_factory=dict, examples=[{"lr": 1e-3}])
    workers: WorkersSpec | None = None


class ShardView(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    count: int = Field(ge=1)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(examples=["fc1.weight"])
    shape: list[int] = Field(max_length=16, examples=[[128, 64]])
    dtype: Literal["float32"] = "float32"
    group: GroupSpec
    lr_scale: float = 1.0
    value: str | None = Field(
        None, description="initial value: base64 of little-endian float32 bytes; zeros if absent"
    )
    shard: ShardView | None = Field(
        None, description="the shard the client believes this server is (checked when given)"
    )


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(min_length=1, examples=[["fc1.weight", "fc1.bias"]])


class ParamInfo(BaseModel):
    name: str
    shape: list[int]
    dtype: Literal["float32"] = "float32"
    group: str
    algorithm: str
    version: int
    lr_scale: float
    state_bytes: int


class TensorStats(BaseModel):
    l2_norm: float
    min: float | None
    max: float | None
    mean: float | None
    nonfinite_fraction: float


class ParamStats(BaseModel):
    name: str
    version: int
    param: TensorStats
    slots: dict[str, TensorStats]
    last_grad_norm: float | None
    last_update_norm: float | None
    norms_at_version: int | None = Field(
        description="the version after the step whose norms are reported"
    )
    count: int | None = Field(
        None,
        description="steps in the optimizer state (the loaded count after a state upload); "
        "null: no state yet",
    )


class LrRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float
    group: str | None = Field(None, description="a group id; every group when absent")


class LrScale(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr_scale: float


class Iteration(BaseModel):
    global_step: int
    autosaved: str | None = Field(
        None, description="the automatic checkpoint written, if one was due"
    )
    autosave_error: str | None = Field(
        None, description="why a due autosave was not written (the iteration ended all the same)"
    )
    dropped: list[str] | None = Field(
        None,
        description="sync workers dropped from the iteration (their lease ran out); absent if none",
    )


class Membership(BaseModel):
    """A run's sync membership (service/workers.py)."""

    iteration: int = Field(description="the iteration now running (the global step + 1)")
    members: list[str] = Field(description="its members")
    joining: list[str] = Field(description="members from the next iteration on")
    started: bool = Field(
        description="the membership of the iteration is fixed (it has started); before, "
        "workers join it directly"
    )
    dropped: list[str] = Field(description="dropped from this iteration (lease ran out)")
    count: int | None = Field(description="the members an iteration needs to start")
    lease_s: float | None = Field(description="a member's lease (null: none)")
    member_from: int | None = Field(
        None, description="join: the first iteration the worker is a member of"
    )


class CheckpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, examples=["before-warmup"])


class Checkpoint(BaseModel):
    name: str
    global_step: int
    bytes: int
    created: float


class CheckpointActivity(BaseModel):
    """A checkpoint save or restore under way."""

    action: Literal["save", "restore"]
    name: str = Field(description="the checkpoint")
    done: int = Field(description="bytes written or read so far")
    total: int = Field(description="bytes in all (0 until known)")


class InvalidCheckpoint(BaseModel):
    """A ``*.safetensors`` entry of the run's folder that is not a checkpoint."""

    name: str = Field(description="the entry's file name, as found in the folder")
    reason: str = Field(description="why it is not listed (nor restored)")


class Limits(BaseModel):
    max_body_bytes: int = Field(description="the largest request body (and tensor) accepted")
    max_state_bytes: int = Field(description="the largest optimizer-state upload")
    max_control_bytes: int = Field(description="the largest shm:// control message")


class Memory(BaseModel):
    budget_bytes: int = Field(description="STEPD_MEMORY_BUDGET: what the server may commit")
    committed_bytes: int = Field(description="parameters and optimizer state, all runs")


class Status(BaseModel):
    """The server as a whole."""

    version: str
    protocol: int = Field(description="the wire protocol (stepd.wire.PROTOCOL)")
    device: str
    shard: ShardView
    runs: int
    device_bytes: int
    limits: Limits
    memory: Memory


class RunRequest(BaseModel):
    """Join (or create) a named run, or create an anonymous one."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(
        None, description="a named (shared) run; absent: a new anonymous run", examples=["exp-42"]
    )
    fresh: bool = Field(False, description="delete the named run first and start it anew")
    group: GroupSpec | None = Field(
        None, description="the joining client's optimizer configuration, checked right away"
    )
    quota_bytes: int | None = Field(
        None, ge=1, description="a new run's quota: the bytes its parameters and state may commit"
    )


class RunInfo(BaseModel):
    name: str
    anonymous: bool
    created: float = Field(description="when the run was created (seconds since the epoch)")
    idle_s: float = Field(description="seconds since the run was last used")
    global_step: int
    params: int
    device_bytes: int
    committed_bytes: int = Field(description="bytes its parameters and state commit")
    quota_bytes: int | None
    groups: list[dict[str, Any]]


class RunJoined(RunInfo):
    """The reply to joining a run: the run, and what the server expects of its client."""

    protocol: int
    limits: Limits
    shard: ShardView


class ParamSample(BaseModel):
    """One measurement of a parameter (taken every ``stats_every`` of its steps)."""

    version: int = Field(description="the parameter's version right after the measured step")
    step: int = Field(description="the run's global step then")
    time: float = Field(description="when (seconds since the epoch)")
    grad_norm: float | None
    update_norm: float | None
    param_norm: float | None
    update_ratio: float | None = Field(description="update norm / parameter norm")
    lr: float | None = Field(description="the lr the step used: the group's lr × lr_scale")


class ParamHistory(BaseModel):
    name: str
    capacity: int = Field(description="the samples kept (STEPD_HISTORY); older ones are dropped")
    samples: list[ParamSample] = Field(description="oldest first")


class RunSample(BaseModel):
    """One sample of a run (taken every ``stats_every`` iterations)."""

    step: int
    time: float = Field(description="when (seconds since the epoch)")
    lr: float | None = Field(description="the lr of the run's first group")
    steps_per_s: float | None = Field(description="iterations per second, recently")
    grad_norm: float | None = Field(description="√Σ of each parameter's last gradient norm²")
    update_norm: float | None
    param_norm: float | None
    update_ratio: float | None


class RunHistory(BaseModel):
    name: str
    capacity: int = Field(description="the samples kept (STEPD_HISTORY); older ones are dropped")
    samples: list[RunSample] = Field(description="oldest first")


class ParamCurrent(ParamInfo):
    """A parameter and its last measured norms."""

    lr: float = Field(description="its effective lr: the group's lr × lr_scale")
    param_norm: float | None
    last_grad_norm: float | None
    last_update_norm: float | None
    update_ratio: float | None = Field(description="update norm / parameter norm")
    norms_at_version: int | None = Field(description="the version the norms were measured at")


class RunStats(BaseModel):
    """A run's current statistics, every parameter's included (one request to poll)."""

    name: str
    global_step: int
    steps_per_s: float = Field(description="iterations per second, recently (0: none lately)")
    lr: float | None = Field(description="the lr of the run's first group")
    grad_norm: float | None
    update_norm: float | None
    param_norm: float | None
    update_ratio: float | None
    stats_every: int = Field(description="norms are measured every this many steps (0: never)")
    params: list[ParamCurrent]
