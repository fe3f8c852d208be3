"""The CPU thread governor (stepwise/utils/cpu_threads.py): load arithmetic, when it drops and rises, the settings,
and a real busy process making it drop."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepwise.utils import cpu_threads
from stepwise.utils.cpu_threads import CpuSample, ThreadGovernor, other_load, read_sample, threads_for


def test_other_load_is_busy_time_minus_own_per_second():
    before, after = CpuSample(10.0, 100.0, 5.0), CpuSample(12.0, 103.0, 6.0)
    assert other_load(before, after) == pytest.approx(1.0)  # (3 busy - 1 own) / 2 s
    assert other_load(after, after) == 0.0
    assert other_load(before, CpuSample(12.0, 100.5, 6.0)) == 0.0  # counters of different resolution: never < 0


@pytest.mark.parametrize("load, cpus, maximum, expected", [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (0.67, 2, 2, 1), (1.0, 2, 2, 1), (2.5, 2, 2, 1),
    (0.0, 16, 8, 8), (9.7, 16, 8, 6), (1.0, 4, 4, 3)])
def test_threads_for_rounds_the_free_cores(load, cpus, maximum, expected):
    assert threads_for(load, cpus, maximum) == expected


class FakeClock:
    """Samples with a chosen other-process load per second, on a fake monotonic clock."""

    def __init__(self, monkeypatch):
        self.now, self.busy, self.own, self.load = 0.0, 0.0, 0.0, 0.0
        monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: self.now)

    def advance(self, seconds: float, load: float, own: float = 1.0) -> None:
        self.now += seconds
        self.busy += (load + own) * seconds
        self.own += own * seconds

    def sample(self) -> CpuSample:
        return CpuSample(self.now, self.busy, self.own)


def test_governor_drops_at_once_and_rises_after_two_agreeing_samples(monkeypatch):
    clock = FakeClock(monkeypatch)
    calls, logs = [], []
    governor = ThreadGovernor(2, 2, interval_s=0.9, sample=clock.sample, set_threads=calls.append, log=logs.append)
    clock.advance(0.5, load=1.0)
    assert governor.tick() == 2 and calls == []  # within the interval: no sample
    clock.advance(0.6, load=1.0)
    assert governor.tick() == 1 and calls == [1]  # a busy neighbour: down at once
    assert "1.0 of 2 CPUs busy" in logs[0] and "2 -> 1" in logs[0]
    clock.advance(1.0, load=0.0)
    assert governor.tick() == 1  # one quiet sample is not enough
    clock.advance(1.0, load=1.0)
    assert governor.tick() == 1  # the burst came back: the pending rise is dropped
    clock.advance(1.0, load=0.0)
    assert governor.tick() == 1
    clock.advance(1.0, load=0.1)
    assert governor.tick() == 2 and calls == [1, 2]  # two quiet samples in a row: back up
    assert governor.used == {1, 2}
    assert len(logs) == 1  # the second change came within log_every_s: counted, not printed
    clock.advance(61.0, load=2.0)
    governor.tick()
    assert len(logs) == 2 and "1 more changes" in logs[1]


def test_read_sample_sums_the_usable_cpus_busy_columns(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  999 0 999 999 0 0 0 0 0 0\n"
                    "cpu0 100 1 10 5000 7 2 3 4 50 0\n"
                    "cpu1 200 0 20 5000 0 0 0 0 0 0\n"
                    "cpu2 9999 0 0 0 0 0 0 0 0 0\n")
    sample = read_sample([0, 1], stat)
    hz = cpu_threads.os.sysconf("SC_CLK_TCK")
    assert sample.busy == pytest.approx((100 + 1 + 10 + 2 + 3 + 4 + 200 + 20) / hz)  # idle, iowait, guest out
    assert read_sample([0], tmp_path / "missing") is None


def test_mode_setting(monkeypatch):
    monkeypatch.delenv(cpu_threads.ENV, raising=False)
    assert cpu_threads.mode() == "auto"
    monkeypatch.setenv(cpu_threads.ENV, "Fixed")
    assert cpu_threads.mode() == "fixed"
    monkeypatch.setenv(cpu_threads.ENV, "sometimes")
    with pytest.raises(ValueError, match="STEPWISE_CPU_THREADS='sometimes'"):
        cpu_threads.mode()


def test_fixed_mode_leaves_torch_alone_and_other_devices_do_nothing(monkeypatch):
    import torch

    monkeypatch.setattr(cpu_threads, "_governor", None)
    monkeypatch.setattr(cpu_threads, "_started", False)
    monkeypatch.setenv(cpu_threads.ENV, "fixed")
    threads = torch.get_num_threads()
    cpu_threads.tick(torch.device("meta"))
    assert not cpu_threads._started  # not a CPU run: the governor is not even started
    cpu_threads.tick(torch.device("cpu"))
    assert cpu_threads._started and cpu_threads._governor is None and torch.get_num_threads() == threads
    assert cpu_threads.used_counts() == {threads}


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc/stat")
def test_a_real_busy_process_takes_a_thread_away():
    """One process spinning on a core: the governor over the real counters gives up at least one thread."""
    cpus = cpu_threads.usable_cpus()
    if len(cpus) < 2:
        pytest.skip("needs 2 usable CPUs")
    calls: list[int] = []
    governor = ThreadGovernor(len(cpus), len(cpus), interval_s=0.5, sample=lambda: read_sample(cpus),
                              set_threads=calls.append)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and governor.threads == len(cpus):
            time.sleep(0.25)
            governor.tick()
    finally:
        busy.kill()
        busy.wait()
    assert governor.threads <= len(cpus) - 1 and calls and calls[-1] == governor.threads


def test_a_training_run_starts_the_governor_and_logs_it(tmp_path):
    """``stepwise.run`` on the tiny preset: the setting is logged once, at the first step."""
    env = {**cpu_threads.os.environ, cpu_threads.ENV: "auto", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "stepwise.run", "stage=pretrain", "data.preset=tiny", f"data.root={tmp_path / 'data'}",
           f"output_root={tmp_path / 'runs'}", "stage.max_steps=2", "stage.max_eval_images=4", "stage.trackers=[]"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "stepwise: CPU threads:" in line]
    assert len(lines) == 1 and "up to 2 of" in lines[0] and "STEPWISE_CPU_THREADS=fixed keeps 2" in lines[0], lines


@pytest.mark.slow
def test_contention_bench_prints_old_and_new_beside_a_busy_process():
    bench = Path(__file__).resolve().parents[1] / "bench" / "cpu_contention.py"
    cmd = [sys.executable, str(bench), "--seconds", "1", "--warmup", "0.5", "--size", "64", "64", "--batch", "1",
           "--competitors", "idle,busy x1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| idle") or
            line.startswith("| busy")]
    assert [(r[0], r[1]) for r in rows] == [("| idle", "old"), ("| idle", "new"), ("| busy x1", "old"),
                                            ("| busy x1", "new")]
    assert all(float(r[2]) > 0 for r in rows)
    bad = subprocess.run([sys.executable, str(bench), "--settings", "new"], capture_output=True, text=True)
    assert bad.returncode == 2 and "includes old" in bad.stderr


def test_threads_now_reads_the_load_once(monkeypatch):
    samples = iter([CpuSample(0.0, 0.0, 0.0), CpuSample(0.5, 0.9, 0.4)])  # others: 0.5 CPU-s in 0.5 s
    monkeypatch.setattr(cpu_threads, "read_sample", lambda cpus: next(samples))
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda s: None)
    assert cpu_threads.threads_now(2) == 1
    monkeypatch.setattr(cpu_threads, "read_sample", lambda cpus: None)
    assert cpu_threads.threads_now(2) == 2
