"""A run's checkpoint folder: atomic saves, listing, loading, pruning, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from stepd.service.checkpoints import CheckpointDir, write_safetensors
from stepd.service.errors import Invalid, NotFound


def meta(step: int) -> dict:
    return {"format": 1, "global_step": step, "groups": {}, "params": {}}


def test_the_folder_appears_with_the_first_save(tmp_path) -> None:
    ckpts = CheckpointDir(tmp_path / "run")
    assert ckpts.list() == []
    assert ckpts.clean_temporaries() == []
    assert not (tmp_path / "run").exists()
    info = ckpts.save({"param/w": np.arange(4, dtype=np.float32)}, meta(3), "first")
    assert (info.name, info.global_step) == ("first", 3)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["first.safetensors"]
    np.testing.assert_array_equal(
        load_file(str(tmp_path / "run" / "first.safetensors"))["param/w"], np.arange(4)
    )


def test_round_trip_list_prune_delete(tmp_path) -> None:
    ckpts = CheckpointDir(tmp_path)
    for step in (1, 2, 3, 4):
        ckpts.save({"param/w": np.full(2, step, np.float32)}, meta(step), f"auto-{step:08d}")
    ckpts.save({"param/w": np.zeros(2, np.float32)}, meta(9), None)  # a generated name
    tensors, m = ckpts.load("auto-00000002")
    np.testing.assert_array_equal(tensors["param/w"], [2, 2])
    assert m["global_step"] == 2
    ckpts.prune_auto(2)
    names = [i.name for i in ckpts.list()]
    assert [n for n in names if n.startswith("auto-")] == ["auto-00000003", "auto-00000004"]
    assert any(n.startswith("step-00000009-") for n in names)
    ckpts.delete("auto-00000003")
    with pytest.raises(NotFound):
        ckpts.delete("auto-00000003")
    with pytest.raises(NotFound):
        ckpts.load("auto-00000003")


def test_leftovers_and_bad_files(tmp_path) -> None:
    ckpts = CheckpointDir(tmp_path)
    ckpts.save({"param/w": np.ones(2, np.float32)}, meta(1), "good")
    (tmp_path / ".half.tmp-0123abcd").write_bytes(b"interrupted")
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:-3])
    assert ckpts.clean_temporaries() == [".half.tmp-0123abcd"]
    with pytest.raises(Invalid, match="malformed"):
        ckpts.load("torn")
    for bad in ("..", "a/b", ".x", "x.safetensors"):
        with pytest.raises(Invalid, match="invalid checkpoint name"):
            ckpts.path(bad)


def test_what_is_not_a_valid_checkpoint_is_skipped_and_never_followed(tmp_path) -> None:
    import os

    outside = CheckpointDir(tmp_path / "elsewhere")
    outside.save({"param/w": np.ones(2, np.float32)}, meta(1), "theirs")
    ckpts = CheckpointDir(tmp_path / "run")
    ckpts.save({"param/w": np.ones(2, np.float32)}, meta(2), "good")
    root = tmp_path / "run"
    (root / "empty.safetensors").write_bytes(b"")
    os.mkfifo(root / "fifo.safetensors")  # opening it for reading would wait for a writer
    (root / "folder.safetensors").mkdir()
    (root / "link.safetensors").symlink_to(tmp_path / "elsewhere" / "theirs.safetensors")
    for i, bad_step in enumerate(("null", "{}", "-3", "Infinity", "[" * 5000 + "]" * 5000)):
        stepd_meta = '{"format": 1, "global_step": ' + bad_step + ', "groups": {}, "params": {}}'
        path = root / f"bad-{i}.safetensors"
        write_safetensors(path, {"param/w": np.ones(2, np.float32)}, {"stepd": stepd_meta})
    assert [i.name for i in ckpts.list()] == ["good"]  # answered at once, nothing else
    for name in ("empty", "fifo", "folder", "link"):
        with pytest.raises(Invalid):
            ckpts.load(name)
