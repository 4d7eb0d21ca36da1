"""Distributed runs on one machine (gloo on CPU): the global batch, resuming with another number of
processes, and what killing or interrupting `kiln train --nproc N` leaves behind."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kiln.bundle import Bundle
from kiln.cli import main
from kiln.errors import ConfigError
from kiln.train.config import SCHEDULES, TrainConfig
from kiln.train.device import Dist
from kiln.train.optim import build_optimizer, build_scheduler, resume_scheduler

KILN = [sys.executable, "-m", "kiln.cli"]
# digits with lenet5: 1,437 training images, 22 steps per epoch at a global batch of 64 with 1 or 2 processes
RUN = ["--data", "digits", "--model", "lenet5", "--batch-size", "64", "--warmup-epochs", "1", "--schedule",
       "cosine"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _epoch_end_rates(cfg: TrainConfig, layout: list[tuple[int, int]]) -> list[float]:
    """The learning rate at the end of each epoch of a run trained in stretches of ``(steps per epoch,
    epochs)``, each stretch resumed from the previous one's checkpoint as the training loop does."""
    rates: list[float] = []
    state = None
    for steps, epochs in layout:
        opt = build_optimizer(cfg, torch.nn.Linear(2, 2).parameters())
        scheduler = build_scheduler(cfg, opt, steps)
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            scheduler = resume_scheduler(cfg, opt, steps, state)
        for _ in range(epochs * steps):
            opt.step()
            scheduler.step()
            if scheduler.last_epoch % steps == 0:
                rates.append(opt.param_groups[0]["lr"])
        state = {"epoch": len(rates), "config": cfg.to_dict(), "optimizer": opt.state_dict(),
                 "scheduler": scheduler.state_dict()}
    return rates


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_resumed_schedule_goes_by_progress_whatever_the_steps_per_epoch(schedule: str,
                                                                        caplog: pytest.LogCaptureFixture):
    """11 steps per epoch (2 processes at a per-process batch), resumed at 22: the rate continues from
    the same point of the run, reaches its minimum at the last epoch and does not climb back."""
    cfg = TrainConfig(schedule=schedule, epochs=6, warmup_epochs=1)
    with caplog.at_level(logging.INFO, logger="kiln.train"):
        resumed = _epoch_end_rates(cfg, [(11, 3), (22, 3)])
    said = [r.getMessage() for r in caplog.records if "steps per epoch" in r.getMessage()]
    assert len(said) == 1 and "resumed with 22 steps per epoch where the run took 11" in said[0], said
    assert resumed[3:] == pytest.approx(_epoch_end_rates(cfg, [(22, 6)])[3:], rel=1e-9)
    if schedule != "onecycle":  # one-cycle's phases are whole steps: the same curve up to rounding
        assert resumed == pytest.approx(_epoch_end_rates(cfg, [(11, 6)]), rel=1e-9)
    assert resumed[-1] == min(resumed)


def test_one_cycle_rebuilt_for_more_epochs_keeps_its_peak():
    cfg = TrainConfig(schedule="onecycle", epochs=2, warmup_epochs=1)
    opt = build_optimizer(cfg, torch.nn.Linear(2, 2).parameters())
    scheduler = build_scheduler(cfg, opt, 10)
    for _ in range(10):
        opt.step()
        scheduler.step()
    state = {"epoch": 1, "config": cfg.to_dict(), "optimizer": opt.state_dict(),
             "scheduler": scheduler.state_dict()}
    longer = cfg.replace(epochs=6)
    opt = build_optimizer(longer, torch.nn.Linear(2, 2).parameters())
    build_scheduler(longer, opt, 10)
    opt.load_state_dict(state["optimizer"])
    resume_scheduler(longer, opt, 10, state)
    # epoch 1 of 6 ends one-cycle's warm-up (1/6 of the run): the peak --lr, not the starting rate (--lr / 25)
    assert opt.param_groups[0]["lr"] == pytest.approx(longer.learning_rate, rel=0.01)


def test_batch_size_is_the_global_batch():
    assert Dist(rank=1, world=4).split_batch(64) == 16
    with pytest.raises(ConfigError,
                       match=r"--batch-size 63 does not split evenly over 2 processes .* use 62 or 64"):
        Dist(world=2).split_batch(63)
    with pytest.raises(ConfigError, match="use 4 or 8"):
        Dist(world=4).split_batch(2)


def test_nproc_refuses_an_uneven_batch_before_starting(capsys: pytest.CaptureFixture[str]):
    assert main(["train", "--nproc", "2", "--batch-size", "63", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use 62 or 64" in err, err


# ---- processes -------------------------------------------------------------------------------------


def _processes_of(run: Path) -> list[int]:
    """Live processes whose command line names the run folder (the launcher and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run).encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_until_gone(run: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (left := _processes_of(run)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes of {run} still running {timeout} s after the launcher: {left}"


def _wait_for_epochs(run: Path, proc: subprocess.Popen, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n + 1:
            return
        time.sleep(0.02)
    log = _output(run).read_text()[-3000:] if _output(run).is_file() else ""
    raise AssertionError(f"the run did not reach epoch {n} (exit status {proc.poll()}): {log}")


def _start(run: Path, *args: str,
           cmd: tuple[str, ...] = (*KILN, "train", "--nproc", "2")) -> subprocess.Popen:
    """`kiln train --nproc 2` in a session of its own (a terminal's foreground job), SIGINT at its default
    (a background job would inherit it ignored). Its output goes to a file: an orphaned worker would hold
    a pipe open."""
    with open(_output(run), "w") as out:
        return subprocess.Popen([*cmd, "--out", str(run), "--no-progress", *args], env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _output(run: Path) -> Path:
    return run.with_name(run.name + ".log")


def _stop(proc: subprocess.Popen, run: Path) -> None:
    for pid in _processes_of(run):
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _signal_after(run: Path, proc: subprocess.Popen, epochs: int, send: Callable[[], None]) -> str:
    """Once ``epochs`` epochs are saved, ``send()`` a signal; wait for the launcher and for every process of
    the run to end (within deadlines). Returns the launcher's output."""
    try:
        _wait_for_epochs(run, proc, epochs)
        assert proc.poll() is None, "training finished before the signal"
        send()
        proc.wait(timeout=120)
        _wait_until_gone(run)  # no worker keeps training and rewriting the folder
    finally:
        _stop(proc, run)
    return _output(run).read_text()


def test_two_process_run_killed_and_resumed_with_one_keeps_the_learning_rate_curve(tmp_path: Path):
    from kiln.train.loop import train

    epochs = 5
    reference, _ = train(TrainConfig(data="digits", model="lenet5", batch_size=64, warmup_epochs=1,
                                     schedule="cosine",
                                     epochs=epochs, out=str(tmp_path / "ref")), progress=False)
    run = tmp_path / "killed"
    proc = _start(run, *RUN, "--epochs", str(epochs))
    # the launcher only: the workers are not told
    _signal_after(run, proc, 2, lambda: os.kill(proc.pid, signal.SIGKILL))
    saved = torch.load(run / "last.pt", weights_only=True)
    done = int(saved["epoch"])
    assert 2 <= done < epochs
    steps = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["scheduler"]["last_epoch"] // epochs
    # the global batch: as many steps as one process takes
    assert saved["scheduler"]["last_epoch"] == done * steps

    resumed, _ = train(resume=run, progress=False)  # one process
    assert [r["world_size"] for r in resumed.history] == [2] * done + [1] * (epochs - done)
    assert [r["lr"] for r in resumed.history] == pytest.approx([r["lr"] for r in reference.history], rel=1e-9)
    training = Bundle.load(run).manifest.training
    assert training["world_size"] == 1
    assert training["world_sizes"] == [{"first_epoch": 1, "last_epoch": done, "world_size": 2},
                                       {"first_epoch": done + 1, "last_epoch": epochs, "world_size": 1}]


def test_ctrl_c_stops_every_process_at_one_batch_with_one_message(tmp_path: Path):
    run = tmp_path / "int"
    proc = _start(run, *RUN, "--epochs", "30")
    # Ctrl-C in a terminal: SIGINT to the foreground process group
    err = _signal_after(run, proc, 1, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert err.count("kiln train --resume") == 1 and err.count("stopping after this batch") == 1, err[-3000:]
    training = Bundle.load(run).manifest.training
    assert training["world_size"] == 2 and training["epochs"] >= 1
    assert [int(r["world_size"]) for r in _metrics(run)] == [2] * training["epochs"]
    torch.load(run / "model.pt", weights_only=True)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_its_workers(tmp_path: Path):
    run = tmp_path / "term"
    proc = _start(run, *RUN, "--epochs", "1000")
    err = _signal_after(run, proc, 1, lambda: os.kill(proc.pid, signal.SIGTERM))
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_sigkill_to_a_torchrun_agent_takes_its_workers_down(tmp_path: Path):
    """The same without kiln's launcher: the workers of a plain `torchrun` die with its agent."""
    run = tmp_path / "torchrun"
    proc = _start(run, *RUN, "--epochs", "1000",
                  cmd=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", "2", "-m", "kiln.cli", "train"))
    _signal_after(run, proc, 1, lambda: os.kill(proc.pid, signal.SIGKILL))


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_named_and_ends_the_run(tmp_path: Path):
    run = tmp_path / "worker"
    proc = _start(run, *RUN, "--epochs", "1000")
    killed: list[int] = []

    def kill_rank_1() -> None:
        killed.extend(pid for pid in _processes_of(run)
                      if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        assert len(killed) == 1
        os.kill(killed[0], signal.SIGKILL)

    err = _signal_after(run, proc, 1, kill_rank_1)
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert f"kiln train: rank 1 (pid {killed[0]}) was killed by SIGKILL" in err
