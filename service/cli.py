"""The ``stepd`` command: ``serve`` runs the server, ``demo`` shows it working."""

from __future__ import annotations

import argparse
import os
import sys


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .config import Settings

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "device": args.device,
            "checkpoint_dir": args.checkpoint_dir,
            "shm_socket": args.shm_socket,
            "shard_index": args.shard_index,
            "shard_count": args.shard_count,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    # One worker: the parameters live in this process. uvicorn handles SIGTERM/SIGINT by
    # finishing in-flight requests, then the lifespan writes the optional final checkpoint.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from stepd import __version__

    parser = argparse.ArgumentParser(prog="stepd", description="stepd: an optimizer-step service")
    parser.add_argument("--version", action="version", version=f"stepd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (settings also from STEPD_* env vars)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    serve.add_argument("--checkpoint-dir", help="default ./checkpoints")
    serve.add_argument("--shm-socket", help="also serve shm:// on this Unix socket (0600)")
    serve.add_argument("--shard-index", type=int, help="this server's shard (default 0)")
    serve.add_argument("--shard-count", type=int, help="servers in the deployment (default 1)")
    serve.add_argument("--log-level", default=os.environ.get("STEPD_LOG_LEVEL", "info"))

    demo = sub.add_parser(
        "demo", help="a server and worker processes training a classifier together"
    )
    demo.add_argument("--workers", type=int, default=3, help="worker processes (2-4)")
    demo.add_argument("--iterations", type=int, default=60)
    demo.add_argument("--keep-serving", action="store_true", help="keep the server up after")

    tour = sub.add_parser("tour", help="train a small classifier with each optimizer")
    tour.add_argument("--steps", type=int, default=300, help="training steps per optimizer")
    tour.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "cpu", "reference", "cuda"),
        help="where the fused steps run (auto: compiled CPU kernels, NumPy fallback)",
    )
    tour.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "tour":
        from .tour import run_tour

        return run_tour(steps=args.steps, backend=args.backend, seed=args.seed)
    from .demo import run_demo

    return run_demo(workers=args.workers, iterations=args.iterations, keep=args.keep_serving)


if __name__ == "__main__":
    sys.exit(main())
