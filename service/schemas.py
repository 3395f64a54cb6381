"""JSON bodies of the API (tensors travel as raw bytes or safetensors, never as JSON)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class GroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: str = Field(examples=["adamw"])
    hyperparams: dict[str, Any] = Field(default_factory=dict, examples=[{"lr": 1e-3}])


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


class LrRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float
    group: str | None = Field(None, description="a group id; every group when absent")


class LrScale(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr_scale: float


class Iteration(BaseModel):
    global_step: int


class CheckpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, examples=["before-warmup"])


class Checkpoint(BaseModel):
    name: str
    global_step: int
    bytes: int
    created: float


class Status(BaseModel):
    global_step: int
    device: str
    params: int
    device_bytes: int
    groups: list[dict[str, Any]]
