"""The ``stepd`` command: ``serve`` runs the server, ``demo`` and ``tour`` show it working,
and ``status``, ``runs``, ``params``, ``inspect`` and ``checkpoints`` look into a running
server (:mod:`.operator`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

# The flags of `stepd serve` that are settings (service/config.py validates their values,
# so that a flag and its STEPD_* variable fail with the same message).
SERVE_FLAGS = (
    "host",
    "port",
    "device",
    "checkpoint_dir",
    "shm_socket",
    "shard_index",
    "shard_count",
    "log_level",
    "history",
)


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _serve(args: argparse.Namespace) -> int:
    # Before the kernels' OpenMP runtime loads: its threads sleep between steps rather than
    # spin for milliseconds after each one (libgomp's default), which took the cores of the
    # training processes a server shares its host with: on 2 cores, a client's 64M-element
    # AdamW step ran 1.7x slower beside a spinning server (bench/client.py). A value the
    # operator set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .config import ConfigError, label, load_settings, unknown_variables

    for warning in unknown_variables():
        print(f"stepd serve: warning: {warning}", file=sys.stderr)
    cli: dict[str, object] = {
        name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None
    }
    if args.access_log:
        cli["access_log"] = True
    try:
        settings = load_settings(cli)
        # Chosen before uvicorn starts: a failing `--device cuda` is then one line here,
        # not a traceback out of the lifespan.
        from .app import DeviceError, choose_device

        try:
            device = choose_device(settings.device)
        except DeviceError as exc:
            reason = str(exc).removeprefix("--device cuda: ")
            where = label("device", settings.device, cli)
            raise ConfigError(f"{where}: {reason}; use auto (the CPU without one) or cpu") from None
    except ConfigError as exc:
        print(f"stepd serve: error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from .app import create_app, log_config

    # One worker: the parameters live in this process. uvicorn handles SIGTERM/SIGINT by
    # finishing in-flight requests, then the lifespan writes the optional final checkpoint.
    uvicorn.run(
        create_app(settings, device),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
    )
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (1 or more)")
    return value


def build_parser() -> Parser:
    from stepd import __version__

    from .operator import add_commands

    parser = Parser(prog="stepd", description="stepd: an optimizer-step service")
    parser.add_argument("--version", action="version", version=f"stepd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (settings also from STEPD_* env vars)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", help="port (default 8000)")
    serve.add_argument("--device", help="auto, cpu or cuda (default auto)")
    serve.add_argument("--checkpoint-dir", help="default ./checkpoints")
    serve.add_argument("--shm-socket", help="also serve shm:// on this Unix socket (0600)")
    serve.add_argument("--shard-index", help="this server's shard (default 0)")
    serve.add_argument("--shard-count", help="servers in the deployment (default 1)")
    serve.add_argument(
        "--log-level", help="critical, error, warning, info, debug or trace (default info)"
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log every request, steps included"
    )
    serve.add_argument(
        "--history", help="measurements each parameter keeps for its plots (default 256)"
    )

    demo = sub.add_parser(
        "demo", help="a server and worker processes training a classifier together"
    )
    demo.add_argument(
        "--workers", type=int, default=3, choices=(2, 3, 4), help="worker processes (2-4)"
    )
    demo.add_argument("--iterations", type=_positive, default=60)
    demo.add_argument(
        "--mode",
        default="sync",
        choices=("sync", "async", "elastic"),
        help="sync rounds, async with max_staleness, or sync with a worker leaving and rejoining",
    )
    demo.add_argument("--keep-serving", action="store_true", help="keep the server up after")

    tour = sub.add_parser("tour", help="train a small classifier with each optimizer")
    tour.add_argument("--steps", type=_positive, default=300, help="training steps per optimizer")
    tour.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "cpu", "reference", "cuda"),
        help="where the fused steps run (auto: compiled CPU kernels, NumPy fallback)",
    )
    tour.add_argument("--seed", type=int, default=0)

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "tour":
        from .tour import run_tour

        return run_tour(steps=args.steps, backend=args.backend, seed=args.seed)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(
            workers=args.workers,
            iterations=args.iterations,
            keep=args.keep_serving,
            mode=args.mode,
        )
    from .operator import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
