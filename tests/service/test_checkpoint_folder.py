"""A run's checkpoint folder under stress: what is not a checkpoint is reported with its
reason (and never read), a restore racing a delete is all or nothing, and a listing reads
headers only."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from stepd.service.checkpoints import CheckpointDir, write_safetensors
from stepd.service.config import Settings
from stepd.service.engine import Engine
from stepd.service.errors import Conflict, NotFound

from tests.support.app import assert_same_snapshot, full_state, make_client, register


def meta(step: int) -> dict:
    return {"format": 1, "global_step": step, "groups": {}, "params": {}}


def _bad_folder(tmp_path: Path) -> tuple[CheckpointDir, dict[str, str]]:
    """A folder with one good checkpoint and one entry per way of not being one; returns
    the folder and, per bad file name, a word its reason must contain."""
    outside = CheckpointDir(tmp_path / "elsewhere")
    outside.save({"param/w": np.ones(2, np.float32)}, meta(1), "theirs")
    ckpts = CheckpointDir(tmp_path / "run")
    ckpts.save({"param/w": np.ones(2, np.float32)}, meta(2), "good")
    root = ckpts.root
    good = (root / "good.safetensors").read_bytes()
    (root / "empty.safetensors").write_bytes(b"")
    (root / "short.safetensors").write_bytes(b"\x01\x00")
    os.mkfifo(root / "fifo.safetensors")  # opening it for reading would wait for a writer
    (root / "folder.safetensors").mkdir()
    (root / "link.safetensors").symlink_to(tmp_path / "elsewhere" / "theirs.safetensors")
    (root / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    (root / "torn.safetensors").write_bytes(good[:-3])
    (root / "grown.safetensors").write_bytes(good + b"\0" * 8)
    (root / "huge-header.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (root / "not-json.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    (root / "a list.safetensors").write_bytes(good)  # a name no route can address
    (root / "x.safetensors.safetensors").write_bytes(good)
    deep = "[" * 100_000 + "]" * 100_000
    write_safetensors(root / "deep.safetensors", {}, {"stepd": deep})
    write_safetensors(root / "foreign.safetensors", {"w": np.ones(2, np.float32)}, {"a": "b"})
    for i, step in enumerate(("null", "-3", "Infinity", "1" * 5000, '"7"')):
        stepd_meta = '{"format": 1, "global_step": ' + step + ', "groups": {}, "params": {}}'
        path = root / f"bad-step-{i}.safetensors"
        write_safetensors(path, {"param/w": np.ones(2, np.float32)}, {"stepd": stepd_meta})
    # Not ours to judge: hidden files (a save's temporaries) and other suffixes.
    (root / ".half.tmp-0123abcd").write_bytes(b"interrupted")
    (root / ".hidden.safetensors").write_bytes(b"")
    (root / "notes.txt").write_bytes(b"")
    reasons = {
        "empty": "empty",
        "short": "shorter",
        "fifo": "FIFO",
        "folder": "folder",
        "link": "symbolic link",
        "dangling": "symbolic link",
        "torn": "the file holds",
        "grown": "the file holds",
        "huge-header": "header length",
        "not-json": "not JSON",
        "a list": "name",
        "x.safetensors": "name",
        "deep": "nested too deeply",
        "foreign": "no stepd metadata",
        **{f"bad-step-{i}": "global step" for i in (0, 1, 2, 4)},
        "bad-step-3": "not JSON",  # an integer beyond Python's digit limit
    }
    return ckpts, {f"{k}.safetensors": v for k, v in reasons.items()}


def test_invalid_entries_are_reported_with_their_reason(tmp_path) -> None:
    ckpts, reasons = _bad_folder(tmp_path)
    valid, invalid = ckpts.scan()
    assert [i.name for i in valid] == ["good"]
    assert [i.name for i in ckpts.list()] == ["good"]
    assert sorted(i.name for i in invalid) == sorted(reasons)
    for item in invalid:
        assert reasons[item.name] in item.reason, item


def test_invalid_entries_over_http_and_deleting_them(tmp_path) -> None:
    with make_client(tmp_path) as c:
        assert register(c, value=np.arange(6, dtype=np.float32)).status_code == 201
        assert c.post("/v1/runs/t/checkpoints", json={"name": "c"}).status_code == 201
        root = tmp_path / "ckpt" / "t"
        (root / "empty.safetensors").write_bytes(b"")
        os.mkfifo(root / "fifo.safetensors")
        (root / "folder.safetensors").mkdir()
        target = tmp_path / "target.safetensors"
        target.write_bytes((root / "c.safetensors").read_bytes())
        (root / "link.safetensors").symlink_to(target)
        before = full_state(c)
        listed = c.get("/v1/runs/t/checkpoints")
        assert listed.status_code == 200
        assert [i["name"] for i in listed.json()] == ["c"]  # the shape clients depend on
        assert set(listed.json()[0]) == {"name", "global_step", "bytes", "created"}
        r = c.get("/v1/runs/t/checkpoints/invalid")
        assert r.status_code == 200, r.text
        got = {i["name"]: i["reason"] for i in r.json()}
        assert set(got) == {f"{n}.safetensors" for n in ("empty", "fifo", "folder", "link")}
        assert "symbolic link" in got["link.safetensors"]
        assert c.get("/v1/runs/nope/checkpoints/invalid").status_code == 404
        for name in ("empty", "fifo", "link"):  # removed by name; the link's target stays
            assert c.delete(f"/v1/runs/t/checkpoints/{name}").status_code == 204
        r = c.delete("/v1/runs/t/checkpoints/folder")
        assert r.status_code == 409, r.text
        assert (root / "folder.safetensors").is_dir()
        assert target.is_file()
        assert [i["name"] for i in c.get("/v1/runs/t/checkpoints/invalid").json()] == [
            "folder.safetensors"
        ]
        # A save whose file name a folder holds is a conflict, and changes nothing.
        r = c.post("/v1/runs/t/checkpoints", json={"name": "folder"})
        assert r.status_code == 409, r.text
        assert_same_snapshot(full_state(c), before)
        assert sorted(p.name for p in root.iterdir()) == ["c.safetensors", "folder.safetensors"]


def test_concurrent_deletes_of_one_checkpoint_are_one_204_and_404s(tmp_path) -> None:
    ckpts = CheckpointDir(tmp_path)
    for _ in range(20):
        ckpts.save({"param/w": np.ones(2, np.float32)}, meta(1), "c")
        barrier = threading.Barrier(4)
        outcomes: list[str] = []

        def delete(barrier: threading.Barrier = barrier, outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                ckpts.delete("c")
                outcomes.append("deleted")
            except NotFound:
                outcomes.append("404")

        threads = [threading.Thread(target=delete) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["404", "404", "404", "deleted"]


def test_listing_opens_no_data_and_never_blocks_on_a_fifo(tmp_path, monkeypatch) -> None:
    ckpts = CheckpointDir(tmp_path)
    ckpts.save({"param/w": np.ones(1 << 16, np.float32)}, meta(3), "big")
    os.mkfifo(tmp_path / "fifo.safetensors")
    read: list[int] = []
    pread = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        read.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    monkeypatch.setattr(os, "read", lambda *a: pytest.fail("a listing reads by offset only"))
    assert [(i.name, i.global_step) for i in ckpts.list()] == [("big", 3)]
    header = struct.unpack("<Q", (tmp_path / "big.safetensors").read_bytes()[:8])[0]
    assert sum(read) == 8 + header  # the header, not the 256 KiB of data


# -- a restore racing a delete -------------------------------------------------------------


def _engine_state(engine: Engine) -> tuple[dict, dict]:
    return full_state(SimpleNamespace(store=engine.run("t").store))


@pytest.mark.parametrize("repetitions", [80])
def test_restore_racing_a_delete_is_all_or_nothing(tmp_path, repetitions: int) -> None:
    engine = Engine(Settings(checkpoint_dir=tmp_path, device="cpu"), "cpu")
    engine.open_run("t")
    rng = np.random.default_rng(0)
    shape = (512, 512)  # ~3 MB of state: a read long enough for a delete to land inside it
    engine.register("t", "w", shape, rng.standard_normal(shape, np.float32), "adamw", {})
    engine.step("t", {"w": rng.standard_normal(shape, np.float32)})
    engine.end_iteration("t")
    engine.save_checkpoint("t", "a")
    saved_a = _engine_state(engine)
    a_bytes = (tmp_path / "t" / "a.safetensors").read_bytes()
    engine.step("t", {"w": rng.standard_normal(shape, np.float32)})
    engine.end_iteration("t")
    engine.set_lr("t", 0.5)
    engine.save_checkpoint("t", "b")  # never deleted: brings state B back each round
    saved_b = _engine_state(engine)
    spans = []
    for _ in range(3):  # how long one restore takes here, to spread the deletes over it
        start = time.perf_counter()
        engine.restore_checkpoint("t", "b")
        spans.append(time.perf_counter() - start)
    span = min(spans)
    chance = random.Random(1)
    seen: dict[str, int] = {"restored": 0, "404": 0}
    for _ in range(repetitions):
        (tmp_path / "t" / "a.safetensors").write_bytes(a_bytes)
        engine.restore_checkpoint("t", "b")
        assert_same_snapshot(_engine_state(engine), saved_b)
        # Each side starts after a random delay (sleeping: a busy wait holds the GIL the
        # other side needs), so the delete lands before, inside or after the restore's read.
        lead, delay = chance.uniform(0, span), chance.uniform(0, 1.5 * span)
        barrier = threading.Barrier(2)
        result: dict[str, object] = {}

        def restore(
            barrier: threading.Barrier = barrier, result: dict = result, lead: float = lead
        ) -> None:
            barrier.wait()
            time.sleep(lead)
            try:
                info = engine.restore_checkpoint("t", "a")
                result["restore"] = ("restored", info.name, info.global_step, info.bytes)
            except NotFound:
                result["restore"] = ("404",)
            except Exception as exc:  # anything else is the bug this test is for
                result["restore"] = ("error", repr(exc))

        def delete(barrier: threading.Barrier = barrier, delay: float = delay) -> None:
            barrier.wait()
            time.sleep(delay)
            engine.delete_checkpoint("t", "a")

        threads = [threading.Thread(target=restore), threading.Thread(target=delete)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcome = result["restore"]
        assert isinstance(outcome, tuple)
        if outcome[0] == "restored":
            assert outcome[1:] == ("a", 1, len(a_bytes))
            assert_same_snapshot(_engine_state(engine), saved_a)
        else:
            assert outcome == ("404",), outcome
            assert_same_snapshot(_engine_state(engine), saved_b)
        assert not (tmp_path / "t" / "a.safetensors").exists()
        seen[outcome[0]] += 1
    # Both sides of the race happened, so neither branch above went untested.
    assert seen["restored"] > 0, seen
    assert seen["404"] > 0, seen


def test_a_save_over_a_folder_is_a_conflict(tmp_path) -> None:
    ckpts = CheckpointDir(tmp_path)
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(Conflict, match="folder"):
        ckpts.save({"param/w": np.ones(2, np.float32)}, meta(1), "x")
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with pytest.raises(Conflict, match="folder"):
        ckpts.delete("x")
