"""stepd shards as Ray actors, and ``connect("ray://<name>", ...)`` to reach them.

::

    import ray, stepd
    from stepd.ray import StepdCluster

    ray.init()
    cluster = StepdCluster.start("opt", num_shards=2, checkpoint_dir="/shared/ckpt")
    opt = stepd.connect("ray://opt", "adamw", run="job", lr=1e-3)

Each shard is an actor that runs ``stepd serve --shard-index i --shard-count K`` as its child
process on a free port of its node, with checkpoints in ``checkpoint_dir/shard-i`` (a path
every node shares) and autosave every ``autosave_every`` iterations. A shard that dies is
restarted by Ray (``max_restarts``), on any node; before it tells anyone its address, the new
server restores the newest checkpoint of every run in its folder. A registry actor
(``stepd:<name>``, namespace ``stepd``) holds the shards, so any process of the Ray cluster
finds them by name.

What a restart loses: the killed shard comes back at its last autosave S; the other shards
went on. :meth:`RayOptimizer.recover` puts every shard back on its checkpoint of step S (a
consistent cut), writes the restored values into the caller's arrays, and returns S: the
iterations after S are lost on every shard and must be computed again (the caller replays
its batches from S). With ``autosave_every=1`` that is at most the iteration in progress.

Nothing of stepd's own crosses Ray: actors exchange only strings, ints and dicts of them
(Ray serializes those with its own machinery); parameters travel over http:// or shm:// as
everywhere else, and checkpoints are the server's safetensors files.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import numpy as np

NAMESPACE = "stepd"  # one namespace, so any job of the Ray cluster resolves ray://<name>
_READY_TIMEOUT = 120.0

# The server is the actor's child; PR_SET_PDEATHSIG makes the kernel kill it when the actor
# dies however it dies (ray.kill is a SIGKILL: no Python cleanup runs), so a dead shard never
# leaves a stale server answering on its old port. Set in the child, then exec: no
# preexec_fn in a threaded actor process.
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"  # the actor died before prctl
    "os.execv(sys.executable, [sys.executable, '-m', 'stepd.service.cli', *sys.argv[2:]])\n"
)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(
            "stepd.ray needs Ray: pip install 'stepd[ray]' (or pip install 'ray>=2.9')"
        ) from None
    return ray


def _registry_name(name: str) -> str:
    return f"stepd:{name}"


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _restore_newest(url: str, folder: Path, token: str | None) -> dict[str, str]:
    """Restore, in a fresh server, the newest valid checkpoint of every run that has a folder
    under ``folder``; returns ``{run: checkpoint}``."""
    restored: dict[str, str] = {}
    if not folder.is_dir():
        return restored
    with httpx.Client(base_url=url, headers=_headers(token), timeout=60.0) as c:
        for entry in sorted(folder.iterdir()):
            if not entry.is_dir() or entry.is_symlink() or entry.name.startswith("."):
                continue
            run = entry.name
            if c.post("/v1/runs", json={"name": run}).status_code not in (200, 201):
                continue  # not a name a run can have: not ours to bring back
            listed = c.get(f"/v1/runs/{quote(run, safe='')}/checkpoints")
            listed.raise_for_status()
            infos = listed.json()
            if not infos:
                continue
            # oldest first: the last of the highest step is the newest write of that step
            best = max(enumerate(infos), key=lambda p: (p[1]["global_step"], p[0]))[1]
            path = f"/v1/runs/{quote(run, safe='')}/checkpoints/{quote(best['name'], safe='')}"
            c.post(f"{path}/restore").raise_for_status()
            restored[run] = best["name"]
    return restored


class _Shard:
    """One shard: ``stepd serve`` as a child process, ready once restored."""

    def __init__(
        self,
        index: int,
        count: int,
        checkpoint_dir: str,
        autosave_every: int,
        autosave_keep: int,
        device: str,
        token: str | None,
        shm: bool,
    ) -> None:
        ray = _ray()
        self.index = index
        self.folder = Path(checkpoint_dir) / f"shard-{index}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = token
        host = ray.util.get_node_ip_address()
        self.node_id: str = ray.get_runtime_context().get_node_id()
        # node-local and short: a Unix socket path has 107 bytes at most
        self.socket = Path(tempfile.gettempdir()) / f"stepd-{index}-{os.getpid()}.sock"
        env = {
            **os.environ,
            "STEPD_AUTOSAVE_EVERY": str(autosave_every),
            "STEPD_AUTOSAVE_KEEP": str(autosave_keep),
        }
        if token:  # the environment, not argv: argv is visible to every user of the node
            env["STEPD_TOKEN"] = token
        last = ""
        for _ in range(3):  # the free port may be taken between the probe and the bind
            port = _free_port(host)
            args = ["serve", "--host", host, "--port", str(port), "--device", device]
            args += ["--checkpoint-dir", str(self.folder), "--log-level", "warning"]
            args += ["--shard-index", str(index), "--shard-count", str(count)]
            if shm:
                args += ["--shm-socket", str(self.socket)]
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, str(os.getpid()), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            self.url = f"http://{host}:{port}"
            last = self._wait_healthy()
            if not last:
                break
        else:
            raise RuntimeError(f"stepd shard {index} did not start: {last}")
        self.shm_url = f"shm://{self.socket}" if shm else None
        self.restored = _restore_newest(self.url, self.folder, token)
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def _wait_healthy(self) -> str:
        """'' once the server answers, else why it will not."""
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else b""
                return out.decode(errors="replace")[-2000:]
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return ""
            time.sleep(0.05)
        self.proc.kill()
        return f"no answer on {self.url} in {_READY_TIMEOUT:.0f} s"

    def address(self) -> dict[str, Any]:
        """Where this shard serves (only answered once it is restored and serving)."""
        return {
            "index": self.index,
            "http": self.url,
            "shm": self.shm_url,
            "node_id": self.node_id,
            "pid": self.proc.pid,
            "restored": dict(self.restored),
            "restarted": self.restarted,
        }

    def stop(self) -> int:
        """SIGTERM and wait: a graceful stop (``STEPD_CHECKPOINT_ON_SHUTDOWN`` applies)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with suppress(FileNotFoundError):
            self.socket.unlink()
        return int(self.proc.returncode)


class _Registry:
    """The named actor ``ray://<name>`` resolves: it holds the shards' handles."""

    def __init__(self, shards: Sequence[str], settings: Mapping[str, Any]) -> None:
        # Names, not handles: plain strings travel inline with the actor's spec, so Ray can
        # always rerun this constructor on a restart (handles would live in the object store).
        ray = _ray()
        self.shards = [ray.get_actor(n, namespace=NAMESPACE) for n in shards]
        self.settings = dict(settings)

    def addresses(self) -> list[dict[str, Any]]:
        # A restarting shard's call waits for it (max_task_retries=-1): what comes back is
        # always a shard that has restored its checkpoints.
        ray = _ray()
        return list(ray.get([s.address.remote() for s in self.shards]))

    def info(self) -> dict[str, Any]:
        return dict(self.settings)

    def shard_handles(self) -> list[Any]:
        return list(self.shards)


class StepdCluster:
    """K stepd shards on a Ray cluster, found by name (``ray://<name>``)."""

    def __init__(self, name: str, registry: Any) -> None:
        self.name = name
        self.registry = registry
        self._owned: list[Any] = []

    @classmethod
    def start(
        cls,
        name: str,
        num_shards: int,
        checkpoint_dir: str | os.PathLike[str],
        *,
        resources_per_shard: Mapping[str, Any] | None = None,
        placement: Literal["spread", "pack"] = "spread",
        autosave_every: int = 1,
        autosave_keep: int = 3,
        max_restarts: int = -1,
        device: str = "auto",
        token: str | None = None,
        shm: bool = True,
        detached: bool = False,
        timeout: float = _READY_TIMEOUT,
    ) -> StepdCluster:
        """Start ``num_shards`` shard actors and the registry; returns once all serve.

        ``resources_per_shard``: Ray actor options (``num_cpus``, ``num_gpus``, ``memory``,
        ``resources``; default one CPU). ``placement="spread"`` puts the shards on different
        nodes where Ray can. ``checkpoint_dir`` must be the same path on every node (a
        restarted shard may land elsewhere). ``autosave_every``: a checkpoint every that many
        iterations (``STEPD_AUTOSAVE_EVERY``); 0 disables it and with it recovery.
        ``detached``: the actors outlive the driver (``cluster.shutdown()`` ends them).
        """
        ray = _ray()
        if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
            raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
        if placement not in ("spread", "pack"):
            raise ValueError(f"placement must be 'spread' or 'pack', got {placement!r}")
        if not isinstance(autosave_every, int) or autosave_every < 0:
            raise ValueError(f"autosave_every must be an int >= 0, got {autosave_every!r}")
        root = Path(checkpoint_dir).absolute()
        lifetime = "detached" if detached else None
        options: dict[str, Any] = {"num_cpus": 1, **(resources_per_shard or {})}
        shard_cls = ray.remote(_Shard)
        names = [f"{_registry_name(name)}:shard-{i}" for i in range(num_shards)]
        shards = [
            shard_cls.options(
                name=names[i],
                namespace=NAMESPACE,
                lifetime=lifetime,
                max_restarts=max_restarts,
                max_task_retries=-1,  # calls made while it restarts wait for the new one
                scheduling_strategy="SPREAD" if placement == "spread" else "DEFAULT",
                **options,
            ).remote(i, num_shards, str(root), autosave_every, autosave_keep, device, token, shm)
            for i in range(num_shards)
        ]
        settings = {
            "name": name,
            "num_shards": num_shards,
            "checkpoint_dir": str(root),
            "autosave_every": autosave_every,
        }
        registry = (
            ray.remote(_Registry)
            .options(
                name=_registry_name(name),
                namespace=NAMESPACE,
                lifetime=lifetime,
                num_cpus=0,
                max_restarts=-1,
                max_task_retries=-1,
            )
            .remote(names, settings)
        )
        cluster = cls(name, registry)
        # Ray ends a non-detached actor once its creator holds no handle to it: the cluster
        # object keeps them (keep it alive, or pass detached=True).
        cluster._owned = shards
        try:
            cluster.addresses(timeout=timeout)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    @classmethod
    def get(cls, name: str) -> StepdCluster:
        """The running cluster ``name`` (from any process of the Ray cluster)."""
        return cls(name, _ray().get_actor(_registry_name(name), namespace=NAMESPACE))

    def addresses(self, timeout: float | None = _READY_TIMEOUT) -> list[dict[str, Any]]:
        """Each shard's ``http``, ``shm`` (or None), ``node_id``, ``restored`` checkpoints;
        waits for shards that are restarting."""
        return list(_ray().get(self.registry.addresses.remote(), timeout=timeout))

    def urls(self, timeout: float | None = _READY_TIMEOUT) -> list[str]:
        """The shards' http:// URLs, in shard order (what ``stepd.connect([...])`` takes)."""
        return [a["http"] for a in self.addresses(timeout)]

    def shard_actors(self) -> list[Any]:
        """The shard actors' handles, in shard order (to watch them, or kill one in a test)."""
        return list(_ray().get(self.registry.shard_handles.remote()))

    def shutdown(self) -> None:
        """Stop every server gracefully, then end the actors (no restart)."""
        ray = _ray()
        shards = self.shard_actors()
        with suppress(Exception):
            ray.get([s.stop.remote() for s in shards], timeout=60)
        for actor in [*shards, self.registry]:
            with suppress(Exception):
                ray.kill(actor, no_restart=True)


# -- the client ------------------------------------------------------------------------------


def resolve(url: str, timeout: float | None = _READY_TIMEOUT) -> list[str]:
    """The shard URLs behind ``ray://<name>``: shm:// for a shard on this process's node
    (unless ``?transport=http``), http:// for the others."""
    parts = urlsplit(url)
    if parts.scheme != "ray" or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"expected ray://<cluster name>, got {url!r}")
    query = parse_qs(parts.query)
    transport = query.pop("transport", ["auto"])[-1]
    if query or transport not in ("auto", "http"):
        raise ValueError(f"ray:// takes only ?transport=auto|http, got {url!r}")
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address="auto")  # a driver on a node of a running Ray cluster
    here = ray.get_runtime_context().get_node_id()
    cluster = StepdCluster.get(parts.netloc)
    return [
        a["shm"] if transport == "auto" and a["shm"] and a["node_id"] == here else a["http"]
        for a in cluster.addresses(timeout)
    ]


def connect(url: str, algorithm: str = "adamw", **options: Any) -> RayOptimizer:
    """``stepd.connect("ray://<name>", ...)``: the cluster's shards, sharded by name as with a
    list of URLs; takes :func:`stepd.client.connect`'s arguments."""
    return RayOptimizer(url, algorithm, options)


class RayOptimizer:
    """A sharded optimizer over the shards of a :class:`StepdCluster`, which can reconnect
    after a shard restarts (:meth:`recover`). Everything else is the sharded optimizer's."""

    def __init__(self, url: str, algorithm: str, options: Mapping[str, Any]) -> None:
        from stepd.client import connect as connect_urls

        self.url = url
        self.algorithm = algorithm
        self.options = dict(options)
        self.urls = resolve(url)
        self.inner: Any = connect_urls(self.urls, algorithm, **self.options)
        # every name's shape and array (the ones last stepped): recover() writes into them
        self._arrays: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def step(self, name: str, shape: Sequence[int], param: np.ndarray, grad: np.ndarray) -> None:
        self.inner.step(name, shape, param, grad)
        self._arrays[name] = (tuple(shape), param)

    def step_batch(self, items: Iterable[Any], last: bool = False) -> None:
        items = list(items)
        self.inner.step_batch(items, last)
        for name, shape, param, _ in items:
            self._arrays[name] = (tuple(shape), param)

    def register(self, name: str, shape: Sequence[int], param: np.ndarray) -> None:
        self.inner.register(name, shape, param)
        self._arrays[name] = (tuple(shape), param)

    def buffers(self, *args: Any) -> Any:
        raise TypeError("ray:// does not lend shared buffers (a shard may move to another node)")

    def recover(self, timeout: float | None = _READY_TIMEOUT) -> int:
        """After a shard failed (a ``TransportError``): wait for the restarted shards, put
        every shard back on its checkpoint of the newest step S they all have, reconnect,
        and write the restored values into the arrays last stepped. Returns S; the
        iterations after it are lost and must be run again. One process recovers a run: the
        other workers of a sync group must wait for it, then reconnect."""
        run = self.options.get("run")
        if run is None:
            raise ValueError("recover() needs a named run: an anonymous one died with its shard")
        token = self.options.get("token")
        with suppress(Exception):  # the dead shard's connection fails to close cleanly
            self.inner.close()
        cluster = StepdCluster.get(urlsplit(self.url).netloc)
        http = [a["http"] for a in cluster.addresses(timeout)]
        # The step S every shard has a checkpoint of: the killed shard restored its newest.
        per_shard: list[dict[int, str]] = []
        for base in http:
            with httpx.Client(base_url=base, headers=_headers(token), timeout=60.0) as c:
                r = c.get(f"/v1/runs/{quote(run, safe='')}/checkpoints")
                infos = r.json() if r.status_code == 200 else []
            per_shard.append({int(i["global_step"]): str(i["name"]) for i in infos})
        common = set.intersection(*(set(steps) for steps in per_shard))
        if not common:
            raise RuntimeError(
                f"run {run!r}: the shards have no checkpoint of a common step to go back to "
                f"(steps per shard: {[sorted(s) for s in per_shard]})"
            )
        step = max(common)
        # Every shard, the ones that did not fail too: their state may hold steps of the
        # iteration in progress, applied before the failure stopped it.
        for base, names in zip(http, per_shard, strict=True):
            path = f"/v1/runs/{quote(run, safe='')}/checkpoints/{quote(names[step], safe='')}"
            r = httpx.post(f"{base}{path}/restore", headers=_headers(token), timeout=60.0)
            r.raise_for_status()
        from stepd.client import connect as connect_urls

        self.urls = resolve(self.url, timeout)
        self.inner = connect_urls(self.urls, self.algorithm, **{**self.options, "fresh": False})
        for name, (shape, param) in self._arrays.items():
            self.inner.register(name, shape, param)  # the server's copy wins: written in place
        return step

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> RayOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
