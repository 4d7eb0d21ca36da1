import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kiln.bundle import Bundle
from kiln.cli import main
from kiln.train.config import TrainConfig
from kiln.train.loop import train

KILN = [sys.executable, "-m", "kiln.cli"]


def test_bundle_from_training(digits_bundle: Path):
    b = Bundle.load(digits_bundle)
    m = b.manifest
    assert m.task == "classify" and m.classes == [str(i) for i in range(10)]
    assert m.architecture.name == "lenet5" and m.training["data"] == "digits"
    # recorded so serving normalizes identically
    assert m.preprocess.mean[0] > 0.1 and m.preprocess.std[0] > 0.1
    state = torch.load(digits_bundle / "model.pt", weights_only=True)
    assert "features.0.weight" in state
    assert m.artifacts["model.pt"].metrics["top1"] > 85
    for f in ("last.pt", "best.pt", "metrics.csv", "curves.png", "config.json"):
        assert (digits_bundle / f).is_file(), f
    assert any((digits_bundle / "tensorboard").iterdir())
    rows = list(csv.DictReader((digits_bundle / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"] and float(rows[-1]["val_top1"]) > 85


def test_cli_json_summary_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rc = main(["train", "--epochs", "1", "--optimizer", "momentum", "--schedule", "step", "--label-smoothing",
               "0.1",
               "--grad-clip", "1.0", "--out", str(tmp_path / "r"), "--json", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "lenet5" and out["epochs"] == 1 and out["metrics"]["top1"] > 20
    assert out["files"]["model"].endswith("model.pt")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "resnet19"], "Did you mean 'resnet18'"),
        (["--data", "digitz"], "Did you mean 'digits'"),
        (["--optimizer", "adamm"], "Did you mean 'adam"),
        (["--schedule", "cosin"], "Did you mean 'cosine'"),
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--lr", "-0.1"], "--lr: must be > 0"),
        (["--val-fraction", "1.5"], "--val-fraction: must be in (0, 1)"),
        (["--data", "mnist:/nonexistent"], "does not exist"),
        (["--model", "kiln-det-s"], "detect model"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], needle: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]):
    try:
        rc = main(["train", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x" / "kiln.json").exists()


def test_corrupt_checkpoint_on_resume_changes_nothing(tmp_path: Path, digits_bundle: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "run"
    shutil.copytree(digits_bundle, run)
    (run / "last.pt").write_bytes(b"\x00not a checkpoint")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "corrupt or unreadable" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (tmp_path / "w.pt").write_text("nope")
    assert (
        main(["train", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "n"), "--no-progress"])
        == 2
    )
    assert "cannot read weights" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run(digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = Path(shutil.copytree(digits_bundle, tmp_path / "run"))  # a failed refusal would overwrite it
    before = (run / "model.pt").read_bytes()
    assert main(["train", "--out", str(run), "--no-progress"]) == 2
    assert (run / "model.pt").read_bytes() == before
    assert "--resume" in capsys.readouterr().err


def _last_model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path):
    epochs = 6
    args = ["--epochs", str(epochs), "--seed", "7", "--deterministic", "--no-progress", "--batch-size", "32"]
    # The reference runs in its own process too: thread counts or deterministic flags set by other tests
    # in this process would change float reduction order, not what is being tested.
    subprocess.run([*KILN, "train", "--out", str(tmp_path / "ref"), *args], check=True, capture_output=True,
                   timeout=300)

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*KILN, "train", "--out", str(run), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # kill once two epochs are on disk: the third is in flight
            metrics = run / "metrics.csv"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = torch.load(run / "last.pt", weights_only=False)["epoch"]
    assert 2 <= done < epochs
    subprocess.run([*KILN, "train", "--resume", str(run), "--no-progress"], check=True, capture_output=True,
                   timeout=300)
    a, b = _last_model(tmp_path / "ref"), _last_model(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert Bundle.load(run).manifest.training["epochs"] == epochs


def test_ddp_two_cpu_processes_with_gloo(tmp_path: Path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kiln.cli", "train", "--epochs", "5", "--out", str(run), "--no-progress", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)  # only rank 0 prints
    m = Bundle.load(run).manifest
    assert m.training["world_size"] == 2
    assert summary["metrics"]["top1"] > 85
    torch.load(run / "model.pt", weights_only=True)


def _wait_for_epochs(run: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n + 1:
            return
        time.sleep(0.02)
    raise AssertionError("training did not reach the expected epoch")


def test_ctrl_c_stops_cleanly_with_a_resumable_bundle(tmp_path: Path):
    run = tmp_path / "int"
    # A shell that starts jobs in the background hands them SIGINT ignored, and the child would inherit
    # that (as `nohup` intends): give it the default disposition, as a terminal would.
    proc = subprocess.Popen([*KILN, "train", "--out", str(run), "--epochs", "30", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_epochs(run, proc, 1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "kiln train --resume" in err and "Traceback" not in err
    b = Bundle.load(run)
    assert b.manifest.training["epochs"] >= 1 and (run / "last.pt").is_file()
    torch.load(run / "model.pt", weights_only=True)


def test_resume_rejects_changed_settings(digits_bundle: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]):
    run = Path(shutil.copytree(digits_bundle, tmp_path / "run"))  # a failed refusal would train it further
    assert main(["train", "--resume", str(run), "--lr", "0.5", "--no-progress"]) == 2
    assert "only --device, --epochs, --workers may change (got --lr)" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_resume_with_more_epochs_continues_the_schedule(tmp_path: Path, schedule: str):
    run = tmp_path / schedule
    train(TrainConfig(epochs=2, schedule=schedule, out=str(run)), progress=False)
    first = [r["lr"] for r in torch.load(run / "last.pt", weights_only=False)["history"]]
    result, trainer = train(resume=run, overrides={"epochs": 4}, progress=False)
    lrs = [r["lr"] for r in result.history]
    assert len(lrs) == 4 and lrs[:2] == first
    # the rebuilt 4-epoch schedule continues from step 2/4 (no restart at the peak) and decays to its end
    peak = trainer.cfg.learning_rate
    assert lrs[3] < lrs[2] < 0.6 * peak
    assert lrs[3] < 0.05 * peak
