"""Resuming safely, resuming a finished run, noticing a throttled run, and the `kiln train --nproc` and
`kiln data sample` conveniences."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from kiln.bundle import Bundle
from kiln.cli import build_parser, main
from kiln.train.cli import _child_argv
from kiln.train.throttle import throttle_warning


class _CreatesAFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # runs on unpickling with weights_only=False
        return (open, (str(self.path), "w"))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_crafted_checkpoint_is_never_run(tmp_path: Path, digits_bundle: Path,
                                         capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "run"
    shutil.copytree(digits_bundle, run)
    marker = tmp_path / "pwned"
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save({**state, "history": _CreatesAFile(marker)}, run / "last.pt")
    before = _tree_hashes(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "not a kiln training checkpoint" in err and "open" in err
    assert _tree_hashes(run) == before


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, digits_bundle: Path,
                                                 capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "run"
    shutil.copytree(digits_bundle, run)
    # an exported artifact recorded in kiln.json must survive (a rewrite would drop it)
    (run / "model.onnx").write_bytes(b"onnx bytes")
    bundle = Bundle.load(run)
    bundle.add_artifact("model.onnx", "onnx", "fp32")
    bundle.save()
    before = _tree_hashes(run)
    manifest = (run / "kiln.json").read_text()
    for extra in ([], ["--epochs", "4"], ["--epochs", "2"]):
        assert main(["train", "--resume", str(run), "--no-progress", "--json", *extra]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["up_to_date"] is True
        assert "nothing changed on disk" in err
        assert _tree_hashes(run) == before
        assert (run / "kiln.json").read_text() == manifest


def test_changed_epochs_on_resume_says_what_happens_to_the_schedule(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture):
    from kiln.train.config import TrainConfig
    from kiln.train.loop import train

    run = tmp_path / "r"
    train(TrainConfig(epochs=1, warmup_epochs=0, out=str(run)), progress=False)
    with caplog.at_level(logging.INFO, logger="kiln.train"):
        train(resume=run, overrides={"epochs": 2}, progress=False)
    lines = [r.getMessage() for r in caplog.records if "schedule" in r.getMessage()]
    assert len(lines) == 1 and "cosine schedule is rebuilt for 2 epochs" in lines[0], lines


@pytest.mark.parametrize(
    "rates,warn",
    [
        ([], False),
        ([900.0], False),
        ([900.0, 1000.0, 950.0, 400.0], False),  # slower, but within 3x of the best
        ([300.0, 1000.0, 320.0], True),  # the first epoch was slow too; the best one counts
        ([1000.0, 1000.0, 250.0], True),
    ],
)
def test_throttle_warning(rates: list[float], warn: bool):
    msg = throttle_warning(rates)
    assert (msg is not None) == warn
    if msg:
        assert "OMP_NUM_THREADS" in msg and "OMP_WAIT_POLICY=PASSIVE" in msg and "\n" not in msg


def test_throttle_warning_is_logged_once(caplog: pytest.LogCaptureFixture):
    from kiln.train.loop import Trainer

    trainer = Trainer.__new__(Trainer)  # only the history and the flag are involved
    trainer.throttle_warned = False
    trainer.history = []
    with caplog.at_level(logging.WARNING, logger="kiln.train"):
        for rate in (1000.0, 900.0, 200.0, 150.0, 100.0):
            trainer.history.append({"images_per_s": rate})
            trainer._warn_if_throttled()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_main_sets_a_passive_omp_wait_policy_unless_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["data", "sample", "digits", "--out", str(tmp_path / "a"), "--count", "1"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["data", "sample", "digits", "--out", str(tmp_path / "b"), "--count", "1"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_data_sample_writes_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from PIL import Image

    assert main(["data", "sample", "digits", "--out", str(tmp_path / "d")]) == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert len(paths) == 10 and {p.name.split("-")[1] for p in paths} == {str(i) for i in range(10)}
    assert all(p.name.startswith("digit-") and Image.open(p).size == (64, 64) for p in paths)
    assert main(["data", "sample", "shapes", "--out", str(tmp_path / "s"), "--count", "2"]) == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert [p.name for p in paths] == [
        "shapes-0.png",
        "shapes-0-boxes.png",
        "shapes-1.png",
        "shapes-1-boxes.png",
    ]
    assert all(p.is_file() for p in paths)


def test_data_sample_needs_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["data", "sample", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a dataset" in err and len(err.splitlines()) == 1


def test_nproc_passes_every_given_option_but_itself():
    args = build_parser().parse_args(["train", "--nproc", "2", "--epochs", "1", "--seed", "0",
                                      "--deterministic",
                                      "--out", "runs/x", "--json", "--no-progress"])
    assert sorted(_child_argv(args)) == sorted(
        ["--epochs", "1", "--seed", "0", "--deterministic", "--out", "runs/x", "--json", "--no-progress"])
    assert "--nproc" not in _child_argv(args)


def test_nproc_inside_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2", "--no-progress"]) == 2
    assert "already one of 2" in capsys.readouterr().err
