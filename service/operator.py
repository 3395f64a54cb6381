"""Operator commands against a running server, over its HTTP API:

    stepd status                          the server: version, device, memory, limits
    stepd runs                            every run: step, parameters, bytes, idle time
    stepd params RUN                      the run's parameters
    stepd inspect RUN NAME                a parameter's statistics, per state slot, and
                                          the trend of its measured norms (its history)
    stepd checkpoints RUN [list | save [NAME] | restore NAME | delete NAME]

``--url`` (default ``$STEPD_URL``, else http://127.0.0.1:8000) and ``--token`` (default
``$STEPD_TOKEN``). Tables are drawn with rich on a terminal and printed as plain aligned
columns otherwise (pipes, files: no colour codes, no box characters). A refusal by the
server is one line with its status and ``detail``, and exit status 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class OperatorError(Exception):
    """What went wrong, as one line for the operator."""


def add_commands(sub: Any) -> None:
    """The operator subcommands, on ``stepd``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("STEPD_URL", DEFAULT_URL),
        help=f"the server (default $STEPD_URL, else {DEFAULT_URL})",
    )
    common.add_argument("--token", help="bearer token (default $STEPD_TOKEN)")
    sub.add_parser("status", parents=[common], help="a running server: version, device, memory")
    sub.add_parser("runs", parents=[common], help="a running server's runs")
    params = sub.add_parser("params", parents=[common], help="a run's parameters")
    params.add_argument("run")
    inspect = sub.add_parser(
        "inspect", parents=[common], help="a parameter's statistics, per state slot"
    )
    inspect.add_argument("run")
    inspect.add_argument("name", help="the parameter")
    ckpt = sub.add_parser(
        "checkpoints", parents=[common], help="list, save, restore or delete a run's checkpoints"
    )
    ckpt.add_argument("run")
    ckpt.add_argument(
        "action", nargs="?", default="list", choices=("list", "save", "restore", "delete")
    )
    ckpt.add_argument("name", nargs="?", help="the checkpoint (save: optional)")


def run_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    token = args.token or os.environ.get("STEPD_TOKEN") or None
    headers = {"authorization": f"Bearer {token}"} if token else {}
    # a save or restore takes as long as its bytes take to reach the disk: no read timeout
    timeout = httpx.Timeout(60.0, read=None) if args.command == "checkpoints" else 60.0
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=timeout) as client:
            HANDLERS[args.command](Api(client, args.url), args, out)
    except OperatorError as exc:
        print(f"stepd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


class Api:
    def __init__(self, client: httpx.Client, url: str) -> None:
        self.client, self.url = client, url

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise OperatorError(
                f"cannot reach {self.url}: {exc or type(exc).__name__} "
                "(is `stepd serve` running there? see --url)"
            ) from None
        if r.status_code >= 400:
            hint = " (set STEPD_TOKEN or --token)" if r.status_code == 401 else ""
            raise OperatorError(f"{r.status_code} {r.reason_phrase}: {_detail(r)}{hint}")
        return r.json() if r.content else None


def _detail(r: httpx.Response) -> str:
    """The server's ``detail``, on one line (FastAPI's 422 has a list of errors)."""
    try:
        detail = r.json()["detail"]
    except (ValueError, KeyError, TypeError):
        detail = r.text.strip()
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', e)}"
            if isinstance(e, dict)
            else str(e)
            for e in detail
        )
    return " ".join(str(detail).split()) or "(no detail)"


# -- output ---------------------------------------------------------------------------------


def table(
    out: TextIO,
    headers: Sequence[str] | None,
    rows: Sequence[Sequence[str]],
    right: Sequence[int] = (),
) -> None:
    """Rows under headers (None: a key-value list). Numbers (columns ``right``) align right."""
    if out.isatty():
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        t = Table(box=box.SIMPLE_HEAD, show_header=headers is not None, pad_edge=False)
        for i, h in enumerate(headers or [""] * (len(rows[0]) if rows else 0)):
            t.add_column(h, justify="right" if i in right else "left", no_wrap=True)
        for row in rows:
            t.add_row(*(Text(c) for c in row))  # Text: a name like "w[0]" is not markup
        Console(file=out).print(t)
        return
    lines = [list(headers)] if headers else []
    lines += [list(r) for r in rows]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def duration(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.1f}{unit}"
    return f"{seconds:.0f}s"


def when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _run_path(run: str) -> str:
    return f"/v1/runs/{quote(run, safe='')}"


# -- the commands ---------------------------------------------------------------------------


def status(api: Api, args: argparse.Namespace, out: TextIO) -> None:
    s = api.call("GET", "/v1/status")
    memory, limits = s["memory"], s["limits"]
    used = memory["committed_bytes"] / memory["budget_bytes"] if memory["budget_bytes"] else 0
    rows = [
        ["server", args.url],
        ["version", f"{s['version']} (wire protocol {s['protocol']})"],
        ["device", s["device"]],
        ["shard", f"{s['shard']['index']} of {s['shard']['count']}"],
        ["runs", str(s["runs"])],
        [
            "memory",
            f"{size(memory['committed_bytes'])} committed of {size(memory['budget_bytes'])} "
            f"({used:.1%})",
        ],
        ["on device", size(s["device_bytes"])],
        ["max body", size(limits["max_body_bytes"])],
    ]
    table(out, None, rows)


def runs(api: Api, args: argparse.Namespace, out: TextIO) -> None:
    found = api.call("GET", "/v1/runs")
    if not found:
        print("no runs", file=out)
        return
    rows = [
        [
            r["name"],
            "anonymous" if r["anonymous"] else "named",
            str(r["global_step"]),
            str(r["params"]),
            size(r["committed_bytes"]),
            size(r["quota_bytes"]),
            duration(r["idle_s"]),
        ]
        for r in found
    ]
    headers = ["RUN", "KIND", "STEP", "PARAMS", "COMMITTED", "QUOTA", "IDLE"]
    table(out, headers, rows, right=(2, 3, 4, 5, 6))


def params(api: Api, args: argparse.Namespace, out: TextIO) -> None:
    found = api.call("GET", f"{_run_path(args.run)}/params")
    if not found:
        print(f"run {args.run!r} has no parameters", file=out)
        return
    rows = [
        [
            p["name"],
            "x".join(map(str, p["shape"])) or "scalar",
            p["algorithm"],
            p["group"],
            str(p["version"]),
            f"{p['lr_scale']:g}",
            size(p["state_bytes"]),
        ]
        for p in found
    ]
    headers = ["PARAM", "SHAPE", "ALGORITHM", "GROUP", "VERSION", "LR_SCALE", "STATE"]
    table(out, headers, rows, right=(4, 5, 6))


def inspect(api: Api, args: argparse.Namespace, out: TextIO) -> None:
    s = api.call("GET", f"{_run_path(args.run)}/params/{quote(args.name, safe='')}/stats")
    steps = "no optimizer state yet" if s["count"] is None else f"{s['count']} steps in its state"
    print(f"{s['name']} in run {args.run}: version {s['version']}, {steps}", file=out)
    if s["last_grad_norm"] is not None:
        print(
            f"last measured gradient norm {number(s['last_grad_norm'])}, update norm "
            f"{number(s['last_update_norm'])} (at version {s['norms_at_version']})",
            file=out,
        )
    tensors = {"param": s["param"], **s["slots"]}
    rows = [
        [
            name,
            number(t["l2_norm"]),
            number(t["min"]),
            number(t["max"]),
            number(t["mean"]),
            f"{t['nonfinite_fraction']:.2%}",
        ]
        for name, t in tensors.items()
    ]
    headers = ["TENSOR", "L2_NORM", "MIN", "MAX", "MEAN", "NONFINITE"]
    table(out, headers, rows, right=(1, 2, 3, 4, 5))
    path = f"{_run_path(args.run)}/params/{quote(args.name, safe='')}/history"
    history(out, api.call("GET", path))


TREND = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 32) -> str:
    """The values' shape in block characters, the newest ``width`` of them (gaps: spaces)."""
    values = list(values)[-width:]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low or 1.0
    top = len(TREND) - 1
    return "".join(" " if v is None else TREND[round((v - low) / span * top)] for v in values)


def history(out: TextIO, h: dict[str, Any]) -> None:
    samples = h["samples"]
    if not samples:
        print(f"\nno measurements kept yet (the server keeps {h['capacity']})", file=out)
        return
    first, last = samples[0], samples[-1]
    print(
        f"\nhistory: {len(samples)} measurements, versions {first['version']} to "
        f"{last['version']} (the server keeps {h['capacity']})",
        file=out,
    )
    rows = []
    for key, label in (
        ("grad_norm", "grad norm"),
        ("update_norm", "update norm"),
        ("update_ratio", "update/param"),
        ("param_norm", "param norm"),
        ("lr", "lr"),
    ):
        values = [s[key] for s in samples]
        known = [v for v in values if v is not None]
        low, high = (min(known), max(known)) if known else (None, None)
        rows.append([label, number(values[-1]), number(low), number(high), sparkline(values)])
    table(out, ["METRIC", "LAST", "MIN", "MAX", "TREND (oldest to newest)"], rows, right=(1, 2, 3))


def checkpoints(api: Api, args: argparse.Namespace, out: TextIO) -> None:
    base = f"{_run_path(args.run)}/checkpoints"
    if args.action != "list" and args.action != "save" and not args.name:
        raise OperatorError(f"`checkpoints RUN {args.action}` needs the checkpoint's NAME")
    if args.action == "list":
        if args.name:
            raise OperatorError("`checkpoints RUN list` takes no NAME")
        found = api.call("GET", base)
        invalid = api.call("GET", f"{base}/invalid")
        if found:
            rows = [
                [c["name"], str(c["global_step"]), size(c["bytes"]), when(c["created"])]
                for c in found
            ]
            table(out, ["CHECKPOINT", "STEP", "SIZE", "CREATED"], rows, right=(1, 2))
        else:
            print(f"run {args.run!r} has no checkpoints", file=out)
        for bad in invalid:
            print(f"not a checkpoint: {bad['name']} ({bad['reason']})", file=out)
        return
    if args.action == "save":
        body = {"name": args.name} if args.name else None
        c = with_progress(
            api, base, "save", args.name, out, lambda: api.call("POST", base, json=body)
        )
        verb = "saved"
    elif args.action == "restore":
        path = f"{base}/{quote(args.name, safe='')}/restore"
        c = with_progress(api, base, "restore", args.name, out, lambda: api.call("POST", path))
        verb = "restored"
    else:
        api.call("DELETE", f"{base}/{quote(args.name, safe='')}")
        print(f"deleted checkpoint {args.name} of run {args.run}", file=out)
        return
    print(
        f"{verb} checkpoint {c['name']} of run {args.run} "
        f"(global step {c['global_step']}, {size(c['bytes'])})",
        file=out,
    )


BAR_AFTER = 0.5  # seconds: a save or restore done sooner draws no bar


def with_progress(
    api: Api, base: str, action: str, name: str | None, out: TextIO, request: Callable[[], Any]
) -> Any:
    """``request()`` (a save or restore), with a progress bar on a terminal once it takes
    longer than :data:`BAR_AFTER`: the server's ``.../checkpoints/activity``, polled."""
    if not out.isatty():
        return request()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = request()
        except BaseException as exc:  # handed to the caller's thread below
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(BAR_AFTER)
    if worker.is_alive():
        _draw(api, base, action, name, out, worker)
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _draw(
    api: Api, base: str, action: str, name: str | None, out: TextIO, worker: threading.Thread
) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    more = (TransferSpeedColumn(), TimeRemainingColumn())
    label = f"{'saving' if action == 'save' else 'restoring'} {name or 'checkpoint'}"
    client = api.client
    with (
        httpx.Client(base_url=client.base_url, headers=client.headers, timeout=5) as poll,
        Progress(*columns, *more, console=Console(file=out), transient=True) as bar,
    ):
        task = bar.add_task(label, total=None)
        while worker.is_alive():
            try:
                now = poll.get(f"{base}/activity").json()
            except (httpx.HTTPError, ValueError):  # an older server, or a busy one: no bar
                now = None
            ours = isinstance(now, dict) and now.get("action") == action and now.get("total")
            if ours and (name is None or now.get("name") == name):
                bar.update(task, total=now["total"], completed=now["done"])
            worker.join(0.2)


HANDLERS: dict[str, Callable[[Api, argparse.Namespace, TextIO], None]] = {
    "status": status,
    "runs": runs,
    "params": params,
    "inspect": inspect,
    "checkpoints": checkpoints,
}
