"""Server settings: command-line flags, else ``STEPD_*`` environment variables, else defaults.

:func:`load_settings` is what ``stepd serve`` uses: every mistake becomes one
:class:`ConfigError` line naming the setting (as the operator wrote it: ``--port`` or
``STEPD_PORT``), the bad value and what is allowed — never a validation dump.
"""

from __future__ import annotations

import difflib
import os
import shlex
import tempfile
import types
from collections.abc import Collection, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


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
    # Measurements each parameter keeps (and samples of each run's step rate and lr): the
    # dashboard's plots and /history. 56 bytes a sample, counted in the memory budget.
    history: int = Field(256, ge=0, le=1 << 20)
    # /metrics: runs labelled by name (the first ones seen; the rest are summed under the
    # label "_other"), and whether each parameter of those runs gets series of its own.
    metrics_runs: int = Field(32, ge=0)
    metrics_params: bool = False
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
    # uvicorn's and stepd's log level; the access log (a line per request, steps included)
    # is off unless asked for: at thousands of steps a second it drowns everything else.
    log_level: LogLevel = "info"
    access_log: bool = False

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value  # INFO as well as info

    @model_validator(mode="after")
    def _shard_in_range(self) -> Settings:
        if self.shard_index >= self.shard_count:
            raise ShardOutOfRange(self.shard_index, self.shard_count)
        return self


class ShardOutOfRange(ValueError):
    def __init__(self, index: int, count: int) -> None:
        super().__init__(f"shard_index {index} must be below shard_count {count}")
        self.index, self.count = index, count


@cache
def get_settings() -> Settings:
    return Settings()


class ConfigError(Exception):
    """A setting the server cannot start with; its message is one line for the operator."""


# STEPD_* variables that are not server settings but are read elsewhere (the client, the
# kernel build, the test suite): no warning for these.
OTHER_VARIABLES = frozenset(
    {
        "STEPD_URL",
        "STEPD_RUN",
        "STEPD_OP",
        "STEPD_SHARD_URLS",
        "STEPD_CACHE_DIR",
        "STEPD_CPU_LIBRARY",
        "STEPD_BIND_LIBRARY",
        "STEPD_TEST_FAKE_CUDA",
        "STEPD_REQUIRE_GPU",
        "STEPD_REQUIRE_CUDA_COMPILERS",
        "STEPD_REQUIRE_BROWSER",
        "STEPD_SOAK",
        "STEPD_HUGE_PAGES",  # stepd.hugepages: both ends of shm://
    }
)
SOCKET_PATH_MAX = 107  # sun_path's bytes on Linux, the terminating NUL excluded


def env_name(field: str) -> str:
    return "STEPD_" + field.upper()


def label(field: str, value: object, cli: Collection[str]) -> str:
    """The setting and its value as the operator gave them: ``--port 99999`` for a flag,
    ``STEPD_PORT=99999`` for the environment."""
    shown = shlex.quote(str(value))
    if field in cli:
        return f"--{field.replace('_', '-')} {shown}"
    return f"{env_name(field)}={shown}"


def allowed(field: str) -> str:
    """What the field accepts, in words, from its type and bounds."""
    info = Settings.model_fields[field]
    kind: Any = info.annotation
    optional = False
    if get_origin(kind) in (Union, types.UnionType) and type(None) in get_args(kind):
        kind = next(a for a in get_args(kind) if a is not type(None))
        optional = True
    if get_origin(kind) is Literal:
        text = "one of " + ", ".join(str(a) for a in get_args(kind))
    elif kind is bool:
        text = "true or false"
    elif kind in (int, float):
        text = "an integer" if kind is int else "a number"
        bounds = {
            b: getattr(m, b) for m in info.metadata for b in ("ge", "gt", "le") if hasattr(m, b)
        }
        if "ge" in bounds and "le" in bounds:
            text += f" from {bounds['ge']} to {bounds['le']}"
        elif "ge" in bounds:
            text += f" of at least {bounds['ge']}"
        elif "gt" in bounds:
            text += f" above {bounds['gt']}"
    else:
        text = "a path" if kind is Path else "a string"
    return text + (" (or unset)" if optional else "")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``STEPD_*`` variable nobody reads: a misspelled setting would
    otherwise be silently ignored (pydantic-settings matches names case-insensitively)."""
    environ = os.environ if environ is None else environ
    known = {env_name(f) for f in Settings.model_fields} | OTHER_VARIABLES
    warnings = []
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith("STEPD_") or upper in known:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"{key} is not a stepd setting, ignored{hint}")
    return warnings


def load_settings(cli: Mapping[str, Any]) -> Settings:
    """Settings from the given flags (field name → value) over ``STEPD_*`` variables, with
    the folders they name checked. Raises :class:`ConfigError`."""
    try:
        settings = Settings(**cli)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, cli)) from None
    _check_folders(settings, cli)
    return settings


def _explain(exc: ValidationError, cli: Mapping[str, object]) -> str:
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ShardOutOfRange):
        index = label("shard_index", cause.index, cli)
        count = label("shard_count", cause.count, cli)
        return f"{index}: must be from 0 to {cause.count - 1} (below {count})"
    field = str(error["loc"][0])  # a union adds the member tried: ("memory_budget", "int")
    value = cli.get(field, error["input"])
    return f"{label(field, value, cli)}: must be {allowed(field)}"


def _check_folders(settings: Settings, cli: Mapping[str, object]) -> None:
    problem = _unwritable(Path(settings.checkpoint_dir))
    if problem:
        name = label("checkpoint_dir", settings.checkpoint_dir, cli)
        raise ConfigError(f"{name}: {problem}; must be a writable folder (made if missing)")
    sock = settings.shm_socket
    if sock is None:
        return
    name = label("shm_socket", sock, cli)
    rule = f"must be a socket path in an existing folder, at most {SOCKET_PATH_MAX} bytes"
    if len(os.fsencode(sock)) > SOCKET_PATH_MAX:
        raise ConfigError(f"{name}: {len(os.fsencode(sock))} bytes long; {rule}")
    folder = sock.absolute().parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"{name}: the folder {folder} {what}; {rule}")
    if sock.is_dir():
        raise ConfigError(f"{name}: is a folder; {rule}")


def _unwritable(path: Path) -> str | None:
    """Why checkpoints cannot be written under ``path`` (None: they can). Probed with a
    real file: permission bits say nothing for root or a read-only mount."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return "is a file, not a folder" if probe == path.absolute() else f"{probe} is a file"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"cannot write in {probe} ({exc.strerror})"
    return None
