"""One owner per run: the run-directory lock (held, refused in one line, released however the owner dies) and
job processes that end with the study that started them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOLD = "import sys, time; from stepwise.utils import run_lock; run_lock.hold(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def hold_in_child(directory: Path) -> subprocess.Popen:
    """A process that takes the lock of ``directory`` and keeps it (until killed)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def gone(pid: int) -> bool:
    """True when ``pid`` has ended (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def test_lock_is_held_then_free_after_its_owner_is_killed(tmp_path):
    from stepwise.utils import run_lock

    run = tmp_path / "runs" / "r1" / "pretrain"
    child = hold_in_child(run)
    try:
        owner = run_lock.owner(run)
        assert owner is not None and owner.startswith(f"PID {child.pid} on host {socket.gethostname()}")
        with pytest.raises(run_lock.DirectoryBusy) as err:
            run_lock.hold(run)
        message = str(err.value)
        assert "\n" not in message and str(run) in message and f"PID {child.pid}" in message
        assert not run_lock.holds(run)
    finally:
        child.send_signal(signal.SIGKILL)  # however the owner dies, the kernel drops its lock
        child.wait()
    assert run_lock.owner(run) is None
    run_lock.hold(run)
    try:
        assert run_lock.holds(run) and run_lock.owner(run) is None  # this process's own lock is not "another owner"
        run_lock.hold(run)  # holding again is a no-op
    finally:
        run_lock.release(run)
    assert not run_lock.holds(run) and (run / run_lock.LOCK_NAME).is_file()  # the file stays (one inode)


def test_a_second_run_on_one_directory_is_refused_in_one_line(tmp_path, capsys):
    from stepwise.run import main

    run = tmp_path / "runs" / "r1" / "pretrain"
    child = hold_in_child(run)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([f"output_root={tmp_path / 'runs'}", "exp=r1", "data.preset=tiny", f"data.root={tmp_path / 'd'}"])
    finally:
        child.kill()
        child.wait()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run} is in use by PID {child.pid}" in err
    assert sorted(p.name for p in run.iterdir()) == [".owner.lock"]  # nothing of the run was written
    assert not (tmp_path / "d").exists()


def test_prepare_run_dir_takes_the_lock_before_overwrite_deletes_anything(tmp_path):
    from stepwise.config import load_config, prepare_run_dir
    from stepwise.utils import run_lock

    cfg = load_config([f"output_root={tmp_path}", "exp=e1", "overwrite=true"])
    run = Path(cfg.run_dir)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004.pt").write_bytes(b"x")
    child = hold_in_child(run)
    try:
        with pytest.raises(run_lock.DirectoryBusy, match=f"PID {child.pid}"):
            prepare_run_dir(cfg)
    finally:
        child.kill()
        child.wait()
    assert (run / "checkpoints" / "step_00000004.pt").is_file()  # the owner's checkpoints are untouched
    prepare_run_dir(cfg)
    try:
        assert run_lock.holds(run) and not (run / "checkpoints").exists()
    finally:
        run_lock.release(run)


TINY = """
seeds: 1
base: [data.preset=tiny, model.num_queries=10, model.d_model=32, model.dim_feedforward=64, model.enc_layers=1,
       model.dec_layers=1, model.nheads=4, "data.train_scales=[48]", "data.crop_resize_scales=[48]",
       data.crop_min=40, data.crop_max=48, data.max_size=64, data.eval_scale=48, stage.pretrain.epochs=1000,
       stage.pretrain.max_steps=100000, stage.pretrain.max_eval_images=4, "stage.pretrain.trackers=[]",
       stage.pretrain.checkpoint_every_steps=1]
variants:
  a: {steps: [pretrain]}
"""


def tiny_plan(tmp_path: Path):
    from stepwise.study import build_plan, load_study

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    args = [f"output_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"]
    return path, args, build_plan(load_study(str(path)), [0], args)


def test_a_second_study_on_one_directory_is_refused_in_one_line(tmp_path, capsys):
    from stepwise.study import main

    path, args, _ = tiny_plan(tmp_path)
    child = hold_in_child(tmp_path / "runs" / "tiny")  # the first study's process
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([f"study={path}", *args])
        main([f"study={path}", "dry_run=true", *args])  # a dry run only reads: allowed
    finally:
        child.kill()
        child.wait()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"stepwise: study: study directory {tmp_path / 'runs' / 'tiny'} is in use by PID {child.pid}")
    assert not (tmp_path / "runs" / "tiny" / "seed0").exists()


def test_the_study_never_starts_a_run_another_process_holds(tmp_path, monkeypatch):
    import stepwise.study as study_mod
    import stepwise.study.pool as study_pool
    from stepwise.study import collect, plan_text, run_plan, run_plan_jobs

    path, args, plan = tiny_plan(tmp_path)
    run = plan[0].runs["pretrain"]
    monkeypatch.setattr(study_pool, "ensure_plan_data", lambda plan: None)

    class State:
        is_main_process, num_processes = True, 1
        print = staticmethod(lambda *a: None)
        wait_for_everyone = staticmethod(lambda: None)

    def launch(*args):
        raise AssertionError("a run whose directory is held was started")

    child = hold_in_child(run.dir)  # e.g. a job left running by an earlier study, or another command
    try:
        for failed in (run_plan_jobs(plan, State(), jobs=2, threads=1, launch=launch, poll_s=0),
                       run_plan(plan, State())):
            assert list(failed) == [run.dir]
            assert f"in use by PID {child.pid}" in failed[run.dir] and "not started" in failed[run.dir]
        assert f"in use by PID {child.pid} on host" in plan_text(study_mod.load_study(str(path)), plan)
        _, _, pending, _ = collect(plan, failed)
        assert f"in use by PID {child.pid}" in pending[0]
    finally:
        child.kill()
        child.wait()
    assert sorted(p.name for p in run.dir.iterdir()) == [".owner.lock"]  # nothing read or written there


# ------------------------------------------------------------------------------------- jobs and their parent
def test_a_job_dies_with_its_killed_study(tmp_path):
    """The real launch path: a parent starts a pretrain job with ``launch_job`` and is SIGKILLed; the job
    (training, with the run's lock) ends within seconds, its lock free, its wall time written."""
    from stepwise.utils import run_lock

    path, args, plan = tiny_plan(tmp_path)
    run = plan[0].runs["pretrain"]
    parent_code = (
        "import sys, time\n"
        "from stepwise.study import build_plan, load_study, launch_job\n"
        "plan = build_plan(load_study(sys.argv[1]), [0], sys.argv[2:])\n"
        "job = launch_job(plan[0].runs['pretrain'], 0, 1, [])\n"
        "print(job.process.pid, flush=True)\n"
        "time.sleep(600)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(path), *args], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        job = int(parent.stdout.readline())
        assert wait_until(lambda: (run.dir / "checkpoints").is_dir() or gone(job), 180), "the job never trained"
        assert not gone(job) and (run_lock.owner(run.dir) or "").startswith(f"PID {job} ")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_until(lambda: gone(job), 10), "the job outlived its killed parent"
    finally:
        for pid in (parent.pid, job if "job" in locals() else None):
            if pid and not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: run_lock.owner(run.dir) is None, 5)  # its threads may take a moment more to end
    assert json.loads((run.dir / "wall_time.json").read_text())["seconds"] > 0  # it stopped the SIGTERM way
    log = (run.dir.parent.parent / "logs" / f"{run.key}.log").read_text()
    assert "Traceback" not in log


WATCHED = ("import sys, time; from stepwise.utils.lifeline import die_with_parent; "
           "die_with_parent(int(sys.argv[1]), poll_s=0.1, grace_s=30, kernel_signal=sys.argv[2] == '1'); "
           "print('armed', flush=True); time.sleep(600)")
PARENT = ("import os, subprocess, sys, time; "
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid()), sys.argv[2]], "
          "stdout=subprocess.PIPE, text=True); assert child.stdout.readline().strip() == 'armed'; "
          "print(child.pid, flush=True); time.sleep(600)")


@pytest.mark.parametrize("kernel_signal", [True, False], ids=["pdeathsig", "watchdog"])
def test_a_job_notices_its_parent_is_gone(kernel_signal):
    """Either mechanism alone ends the child: the kernel's parent-death signal, or the thread that watches
    the parent PID (where the kernel's signal is not available)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHED, "1" if kernel_signal else "0"],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert not gone(child)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: gone(child), 5 if kernel_signal else 5), "the child outlived its parent"
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_job_whose_parent_died_before_it_armed_stops_at_once():
    """The race check: when the parent is no longer the expected PID, the job ends before doing anything."""
    code = "from stepwise.utils.lifeline import die_with_parent; die_with_parent(1); import time; time.sleep(60)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGTERM and "ended before this job started" in proc.stderr


def test_a_second_checkpoint_evaluation_into_one_folder_is_refused(tmp_path, capsys, make_untrained_checkpoint):
    from stepwise.evaluate import main

    checkpoint, _ = make_untrained_checkpoint(tmp_path)
    out = tmp_path / "eval_out"
    child = hold_in_child(out)
    try:
        code = main([f"checkpoint={checkpoint}", f"out={out}"])
    finally:
        child.kill()
        child.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (f"error: evaluation directory {out} is in use by {err[-1].split('in use by ')[1]}")
    assert f"PID {child.pid}" in err[-1] and sorted(p.name for p in out.iterdir()) == [".owner.lock"]
