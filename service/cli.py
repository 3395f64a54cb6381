"""The ``stepd`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepd", description="stepd: an optimizer-step service")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small classifier with every optimizer")
    demo.add_argument("--steps", type=int, default=300, help="training steps per optimizer")
    demo.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "cpu", "reference", "cuda"),
        help="where the fused steps run (auto: compiled CPU kernels, NumPy fallback)",
    )
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(steps=args.steps, backend=args.backend, seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
