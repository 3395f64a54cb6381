"""``stepd`` as an operator meets it: configuration mistakes (one line each, as real
subprocesses), the start-up banner, and the operator commands against a real server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support import fakecuda
from tests.support.server import Server, free_port

TOKEN = "s3cret"


def stepd(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("STEPD_")}
    if fakecuda.ENABLED:
        clean["STEPD_TEST_FAKE_CUDA"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "stepd.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        cwd=cwd,
    )


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed (and nothing else)."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "99999"], {}, "--port 99999: must be an integer from 0 to 65535"),
        (["--port", "eighty"], {}, "--port eighty: must be an integer from 0 to 65535"),
        (
            ["--log-level", "verbose"],
            {},
            "--log-level verbose: must be one of critical, error, warning, info, debug, trace",
        ),
        (["--device", "tpu"], {}, "--device tpu: must be one of auto, cpu, cuda"),
        (
            ["--shard-index", "3", "--shard-count", "2"],
            {},
            "--shard-index 3: must be from 0 to 1 (below --shard-count 2)",
        ),
        (
            [],
            {"STEPD_SHARD_INDEX": "3", "STEPD_SHARD_COUNT": "2"},
            "STEPD_SHARD_INDEX=3: must be from 0 to 1 (below STEPD_SHARD_COUNT=2)",
        ),
        (
            [],
            {"STEPD_MAX_BODY_BYTES": "abc"},
            "STEPD_MAX_BODY_BYTES=abc: must be an integer of at least 1",
        ),
        (
            [],
            {"STEPD_MEMORY_BUDGET": "lots"},
            "STEPD_MEMORY_BUDGET=lots: must be an integer of at least 1 (or unset)",
        ),
        (
            [],
            {"STEPD_ANONYMOUS_RUN_TTL": "0"},
            "STEPD_ANONYMOUS_RUN_TTL=0: must be a number above 0",
        ),
        (
            [],
            {"STEPD_CHECKPOINT_ON_SHUTDOWN": "maybe"},
            "STEPD_CHECKPOINT_ON_SHUTDOWN=maybe: must be true or false",
        ),
        (
            [],
            {"STEPD_NONFINITE": "ignore"},
            "STEPD_NONFINITE=ignore: must be one of reject, skip",
        ),
        (["--history", "-1"], {}, "--history -1: must be an integer from 0 to 1048576"),
        ([], {"STEPD_HISTORY": "lots"}, "STEPD_HISTORY=lots: must be an integer from 0 to 1048576"),
        (
            [],
            {"STEPD_METRICS_RUNS": "-2"},
            "STEPD_METRICS_RUNS=-2: must be an integer of at least 0",
        ),
        ([], {"STEPD_METRICS_PARAMS": "some"}, "STEPD_METRICS_PARAMS=some: must be true or false"),
        (
            ["--shm-socket", "/nonexistent-stepd/s.sock"],
            {},
            "--shm-socket /nonexistent-stepd/s.sock: the folder /nonexistent-stepd does not "
            "exist; must be a socket path in an existing folder, at most 107 bytes",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    args: list[str], env: dict[str, str], message: str
) -> None:
    proc = stepd("serve", *args, env=env)
    assert refused(proc) == f"stepd serve: error: {message}"
    assert proc.returncode == 2


def test_a_checkpoint_dir_that_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = stepd("serve", "--checkpoint-dir", "file/checkpoints", cwd=tmp_path)
    assert refused(proc) == (
        f"stepd serve: error: --checkpoint-dir file/checkpoints: {tmp_path / 'file'} is a file;"
        " must be a writable folder (made if missing)"
    )
    proc = stepd("serve", env={"STEPD_CHECKPOINT_DIR": "file"}, cwd=tmp_path)
    assert refused(proc) == (
        "stepd serve: error: STEPD_CHECKPOINT_DIR=file: is a file, not a folder; "
        "must be a writable folder (made if missing)"
    )
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = stepd("serve", "--checkpoint-dir", str(locked))
        assert refused(proc) == (
            f"stepd serve: error: --checkpoint-dir {locked}: cannot write in {locked} "
            "(Permission denied); must be a writable folder (made if missing)"
        )


def test_device_cuda_without_a_usable_gpu_is_one_line() -> None:
    if fakecuda.ENABLED:
        pytest.skip("the CUDA stand-in passes for a GPU")
    from stepd.service.app import DeviceError, choose_device

    try:
        choose_device("cuda")
    except DeviceError as exc:
        reason = str(exc).removeprefix("--device cuda: ")
    else:
        pytest.skip("a usable GPU is present")
    proc = stepd("serve", "--device", "cuda")
    assert refused(proc) == (
        f"stepd serve: error: --device cuda: {reason}; use auto (the CPU without one) or cpu"
    )


def test_a_misspelled_variable_is_warned_about() -> None:
    # the bad port makes it stop right after the warning
    proc = stepd("serve", "--port", "-1", env={"STEPD_PORTT": "9000", "STEPD_URL": "x"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "stepd serve: warning: STEPD_PORTT is not a stepd setting, ignored "
        "(did you mean STEPD_PORT?)",
        "stepd serve: error: --port -1: must be an integer from 0 to 65535",
    ]


def test_usage_errors_are_one_line() -> None:
    assert refused(stepd("tour", "--steps", "0")) == (
        "stepd tour: error: argument --steps: 0 is not a positive integer (1 or more) "
        "(see stepd tour --help)"
    )
    proc = stepd("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("stepd ")


# -- output helpers, no server --------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tables_are_plain_text_off_a_terminal_and_drawn_on_one() -> None:
    from stepd.service.operator import table

    rows = [["w[0]", "12"], ["bias", "3"]]
    plain = io.StringIO()
    table(plain, ["NAME", "N"], rows, right=(1,))
    assert plain.getvalue() == "NAME   N\nw[0]  12\nbias   3\n"
    drawn = Terminal()
    table(drawn, ["NAME", "N"], rows, right=(1,))
    assert "─" in drawn.getvalue()
    assert "w[0]" in drawn.getvalue()  # a cell is text, never markup


def test_demo_progress_off_a_terminal_is_one_line_per_ten_iterations() -> None:
    from stepd.service.demo import progress

    plain, term = io.StringIO(), Terminal()
    for done in range(1, 26):
        progress(done, 25, 1.0 / done, plain)
        progress(done, 25, 1.0 / done, term)
    assert "\r" not in plain.getvalue()
    assert [line.split("]")[1] for line in plain.getvalue().splitlines()] == [
        " 10/25  loss 0.1000",
        " 20/25  loss 0.0500",
        " 25/25  loss 0.0400",
    ]
    assert term.getvalue().count("\r") == 22


def test_only_loopback_hosts_go_without_the_token_warning() -> None:
    from stepd.service.app import _loopback

    assert [_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2")] == [True] * 4
    assert [_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org")] == [False] * 4


# -- against a running server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from stepd.client import connect

    ckpt = tmp_path_factory.mktemp("ckpt")
    with Server(ckpt, run="exp", STEPD_TOKEN=TOKEN, STEPD_STATS_EVERY="1") as srv:
        with connect(srv.url, "adamw", run="exp", token=TOKEN, lr=0.1) as opt:
            w = np.ones((4, 3), np.float32)
            for _ in range(2):
                opt.step_batch([("w", w.shape, w, np.full((4, 3), 0.5, np.float32))])
                opt.end_iteration()
        yield srv


def op(server: Server, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    return stepd(*args, "--url", server.url, env={"STEPD_TOKEN": token} if token else {})


@pytest.mark.e2e
def test_status_runs_params_and_inspect(server: Server) -> None:
    proc = op(server, "status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"server     {server.url}"
    assert lines[2] == f"device     {fakecuda.STORE_DEVICE}"
    assert lines[4] == "runs       1"

    proc = op(server, "runs")
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()
    assert header.split() == ["RUN", "KIND", "STEP", "PARAMS", "COMMITTED", "QUOTA", "IDLE"]
    # 144 bytes of w and its two slots, 14,336 of its history (256 samples of 7 float64)
    assert row.split()[:7] == ["exp", "named", "2", "1", "14.1", "KiB", "-"]

    proc = op(server, "params", "exp")
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()
    headers = ["PARAM", "SHAPE", "ALGORITHM", "GROUP", "VERSION", "LR_SCALE", "STATE"]
    assert header.split() == headers
    cols = row.split()
    assert cols[:3] == ["w", "4x3", "adamw"]
    assert cols[4:] == ["2", "1", "96", "B"]

    proc = op(server, "inspect", "exp", "w")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "w in run exp: version 2, 2 steps in its state"
    assert lines[2].split() == ["TENSOR", "L2_NORM", "MIN", "MAX", "MEAN", "NONFINITE"]
    assert [line.split()[0] for line in lines[3:6]] == ["param", "exp_avg", "exp_avg_sq"]
    assert lines[3].split()[-1] == "0.00%"
    assert lines[6:8] == ["", "history: 2 measurements, versions 1 to 2 (the server keeps 256)"]
    assert lines[8].split() == ["METRIC", "LAST", "MIN", "MAX", "TREND", "(oldest", "to", "newest)"]
    trend = {line[:12].strip(): line.split() for line in lines[9:]}
    assert list(trend) == ["grad norm", "update norm", "update/param", "param norm", "lr"]
    assert trend["grad norm"][2:] == ["1.732"] * 3 + ["▁▁"]  # √(12 × 0.5²)
    assert trend["lr"][1:] == ["0.1", "0.1", "0.1", "▁▁"]
    assert not any(line != line.rstrip() or "\x1b" in line for line in lines)


@pytest.mark.e2e
def test_checkpoints_save_list_restore_delete(server: Server) -> None:
    proc = op(server, "checkpoints", "exp", "save", "first")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("saved checkpoint first of run exp (global step 2, ")
    proc = op(server, "checkpoints", "exp")
    assert proc.stdout.splitlines()[0].split() == ["CHECKPOINT", "STEP", "SIZE", "CREATED"]
    assert proc.stdout.splitlines()[1].split()[:2] == ["first", "2"]
    proc = op(server, "checkpoints", "exp", "restore", "first")
    assert proc.stdout.startswith("restored checkpoint first of run exp (global step 2, ")
    proc = op(server, "checkpoints", "exp", "delete", "first")
    assert proc.stdout == "deleted checkpoint first of run exp\n"
    proc = op(server, "checkpoints", "exp", "restore", "first")
    assert refused(proc) == (
        "stepd checkpoints: error: 404 Not Found: checkpoint 'first' does not exist"
    )
    assert proc.returncode == 1


@pytest.mark.e2e
def test_server_refusals_are_one_line(server: Server) -> None:
    assert refused(op(server, "inspect", "nope", "w")) == (
        "stepd inspect: error: 404 Not Found: run 'nope' does not exist"
    )
    assert refused(op(server, "status", token=None)) == (
        "stepd status: error: 401 Unauthorized: missing or wrong bearer token "
        "(set STEPD_TOKEN or --token)"
    )
    proc = stepd("runs", "--url", server.url, "--token", TOKEN)
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    assert refused(stepd("status", "--url", f"http://127.0.0.1:{port}")) == (
        f"stepd status: error: cannot reach http://127.0.0.1:{port}: [Errno 111] Connection "
        "refused (is `stepd serve` running there? see --url)"
    )


@pytest.mark.e2e
def test_the_banner_says_what_the_server_is(tmp_path: Path) -> None:
    from stepd import __version__

    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("STEPD_")}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "stepd.service.cli", "serve", "--port", str(port)),
            *("--host", "::1", "--device", "cpu", "--checkpoint-dir", str(tmp_path / "c")),
        ],
        env={**clean, "STEPD_MEMORY_BUDGET": str(3 << 30)},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if "Application startup complete" in line:
            break
    proc.terminate()
    proc.wait(30)
    text = "\n".join(lines)
    assert f"INFO:     stepd {__version__} (wire protocol " in text
    assert "device       cpu, kernel backend " in text
    assert "(--device cpu)" in text
    assert f"http         http://[::1]:{port} (dashboard at /, API at /docs)" in text
    assert f"checkpoints  {tmp_path / 'c'}" in text
    assert "memory       budget 3.0 GiB (STEPD_MEMORY_BUDGET)" in text
    assert "token        off" in text
    assert "access log   off (--access-log)" in text
    assert "WARNING" not in text  # loopback: no warning about the missing token


@pytest.mark.e2e
def test_a_save_and_a_restore_on_a_terminal_draw_a_progress_bar(
    server: Server, monkeypatch
) -> None:
    """The bar follows the server's ``.../checkpoints/activity`` (null when idle); off a
    terminal the same command prints its one line and nothing else."""
    import argparse

    import httpx
    from stepd.service import operator

    headers = {"authorization": f"Bearer {TOKEN}"}
    idle = httpx.get(f"{server.url}/v1/runs/exp/checkpoints/activity", headers=headers)
    assert (idle.status_code, idle.json()) == (200, None)
    monkeypatch.setattr(operator, "BAR_AFTER", 0.0)  # the checkpoint is tiny: draw at once
    for action, out, line, label in (
        ("save", Terminal(), "saved checkpoint barred", "saving barred"),
        ("restore", Terminal(), "restored checkpoint barred", "restoring barred"),
        ("restore", io.StringIO(), "restored checkpoint barred", None),
    ):
        args = argparse.Namespace(
            command="checkpoints",
            url=server.url,
            token=TOKEN,
            run="exp",
            action=action,
            name="barred",
        )
        assert operator.run_command(args, out) == 0
        text = out.getvalue()
        assert line in text
        if label is None:
            assert text.count("\n") == 1, text
        else:
            assert label in text, text
