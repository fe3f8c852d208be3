"""Checkpoint files: atomic writes, clear load errors, latest/prune, weights-only init, RNG round trip."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from stepwise.checkpoint import (FINAL_NAME, CheckpointError, checkpoint_path, find_latest, load_checkpoint,
                                 load_model_weights, preserved_rng, prune_checkpoints, resolve_checkpoint,
                                 rng_state, save_checkpoint, set_rng_state)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 5)
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))  # old file intact
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from stepwise.utils.io import WriteError

    path = checkpoint_path(tmp_path, 5)
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteError, match=r"cannot write checkpoint .*step_00000005.pt: no space left on device") as err:
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_torch_writer_failure_on_a_full_disk_says_so(tmp_path, monkeypatch):
    # torch.save(path) reports a short write as RuntimeError("[enforce fail ...] unexpected pos ..."); with
    # the file system then full, the error says "no space left on device" and names the path.
    import stepwise.checkpoint as ckpt
    from stepwise.utils.io import WriteError

    def cpp_writer_failure(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", cpp_writer_failure)
    calls = []

    def free_bytes(folder):  # room before writing, none after the failed write
        calls.append(folder)
        return 10**9 if len(calls) == 1 else 0

    monkeypatch.setattr(ckpt, "free_bytes", free_bytes)
    monkeypatch.setattr("stepwise.utils.io.free_bytes", free_bytes)
    with pytest.raises(WriteError, match=r"cannot write checkpoint .*c.pt: no space left on device \(0.0 MiB"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "c.pt")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    from stepwise.utils.io import WriteError

    monkeypatch.setattr("stepwise.utils.io.free_bytes", lambda folder: 2**20)
    big = {"model": {"w": torch.zeros(2**20)}}  # 4 MiB of tensor
    with pytest.raises(WriteError, match=r"c.pt: no space left on device \(it needs about 5.0 MiB, 1.0 MiB"):
        save_checkpoint(big, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_annotation_write_on_a_full_disk_names_the_path(tmp_path, monkeypatch):
    import builtins
    import errno
    import io

    from stepwise.utils.io import WriteError, atomic_write_json

    target = tmp_path / "d_head.json"
    target.write_text('{"old": 1}')
    real_open = builtins.open

    class FullFile(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            real_open(file, mode).close()
            return FullFile()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(WriteError, match=r"cannot write JSON file .*d_head.json: no space left on device"):
        atomic_write_json(target, {"images": [1, 2, 3]})
    monkeypatch.undo()
    assert target.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["d_head.json"]


def test_load_errors_name_file_and_missing_keys(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {}}, path)
    with pytest.raises(CheckpointError, match=r"c\.pt lacks the keys \['optimizer', 'rng'\]"):
        load_checkpoint(path, required=("model", "optimizer", "rng"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found: .*nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="empty_run holds no checkpoint_final.pt"):
        load_checkpoint(tmp_path / "empty_run")


def test_latest_prune_and_run_dir_resolution(tmp_path):
    for step in (3, 12, 7, 100):
        save_checkpoint({"model": {}, "global_step": step}, checkpoint_path(tmp_path, step))
    assert find_latest(tmp_path).name == "step_00000100.pt"
    assert resolve_checkpoint(tmp_path) == find_latest(tmp_path)
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000003.pt", "step_00000007.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000012.pt", "step_00000100.pt"]
    save_checkpoint({"model": {}}, tmp_path / FINAL_NAME)
    assert resolve_checkpoint(tmp_path) == tmp_path / FINAL_NAME
    assert find_latest(tmp_path / "empty") is None


def test_init_from_loads_weights_only_and_reports(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_checkpoint({"model": source.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                     "global_step": 50}, tmp_path / FINAL_NAME)
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 1))  # layer 1 resized, layer 2 new
    report = load_model_weights(target, tmp_path)
    assert torch.equal(target[0].weight, source[0].weight)
    assert report.missing == ["2.weight", "2.bias"] and report.unexpected == []
    assert [m.split()[0] for m in report.mismatched] == ["1.weight", "1.bias"]
    assert report.loaded == 2 and "shape mismatch" in str(report) and "missing" in str(report)


def test_init_from_refuses_non_finite_weights(tmp_path):
    from stepwise.checkpoint import NonFiniteCheckpointError

    source = nn.Linear(3, 2)
    weights = source.state_dict()
    weights["bias"][1] = float("inf")
    save_checkpoint({"model": weights}, tmp_path / FINAL_NAME)
    with pytest.raises(NonFiniteCheckpointError, match=r"checkpoint_final.pt: tensor 'bias' holds NaN or inf"):
        load_model_weights(nn.Linear(3, 2), tmp_path)


def test_rng_state_round_trip_and_preserved_rng():
    state = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    before = rng_state()
    with preserved_rng():
        torch.rand(10), np.random.rand(3), random.random()
    assert torch.equal(torch.get_rng_state(), before["torch"])
    assert np.array_equal(np.random.get_state()[1], before["numpy"]["keys"].numpy().astype(np.uint32))


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    """Files written atomically get the umask's mode, as ``open(path, "w")`` would, not mkstemp's 0600."""
    import os
    import stat

    from stepwise.utils.io import atomic_write_json

    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    atomic_write_json(tmp_path / "atomic.json", {})
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.json").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
