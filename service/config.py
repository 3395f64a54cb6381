"""Server settings: command-line flags, else ``STEPD_*`` environment variables, else defaults."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPD_", extra="ignore")

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_dir: Path = Path("checkpoints")
    # Largest request body accepted (413 beyond it): a 1 GiB tensor by default.
    max_body_bytes: int = Field(1 << 30, ge=1)
    # Gradients with NaN/Inf: "reject" (422) or "skip" (not applied, counted in /metrics).
    nonfinite: Literal["reject", "skip"] = "reject"
    # Measure a parameter's gradient and update norms (inspection API) on every Nth step of
    # it: each measurement costs a copy and two extra passes over the tensor.
    stats_every: int = Field(16, ge=0)
    # Checkpoint automatically every K iterations (0: never), keeping the newest N of them.
    autosave_every: int = Field(0, ge=0)
    autosave_keep: int = Field(3, ge=1)
    # Write a final checkpoint on graceful shutdown.
    checkpoint_on_shutdown: bool = False
    # Sharded deployments: this server owns the parameters whose stable hash modulo
    # shard_count is shard_index, and refuses the others (and clients that disagree).
    shard_index: int = Field(0, ge=0)
    shard_count: int = Field(1, ge=1)
    # Bytes of parameters and optimizer state (factors included) the server commits to, over
    # all runs; a registration past it is refused (507). Default: half the host's memory on
    # the CPU, 80% of the GPU's.
    memory_budget: int | None = Field(None, ge=1)
    # Anonymous runs (a client's private run) whose client vanished are deleted after this
    # many idle seconds.
    anonymous_run_ttl: float = Field(3600.0, gt=0)
    # Bearer token required on every endpoint but /healthz when set.
    token: str | None = None
    # Also serve the shared-memory transport (shm://PATH) on this Unix socket (mode 0600).
    shm_socket: Path | None = None
    # shm:// connections served at once (a thread each); more wait in the listen backlog.
    shm_max_connections: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _shard_in_range(self) -> Settings:
        if self.shard_index >= self.shard_count:
            raise ValueError(
                f"shard_index {self.shard_index} must be below shard_count {self.shard_count}"
            )
        return self


@cache
def get_settings() -> Settings:
    return Settings()
