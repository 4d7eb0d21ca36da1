"""Defaults chosen from the data: batch size, warm-up, input size, and the validation-at-chance guard."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kiln.data import open_dataset
from kiln.draw import render
from kiln.train.config import TrainConfig, default_batch_size, default_warmup_epochs
from kiln.train.resolve import resolve_settings
from kiln.train.stats import chance_warning


@pytest.mark.parametrize(("images", "expected"), [(192, 16), (1438, 64), (60, 8), (640, 64), (639, 32)])
def test_default_batch_gives_ten_steps_per_epoch(images: int, expected: int) -> None:
    assert default_batch_size("classify", images) == expected


def test_warmup_scales_with_the_run() -> None:
    assert default_warmup_epochs(10, 1000) == pytest.approx(0.5)  # 5% of the run
    assert default_warmup_epochs(2, 1000) == pytest.approx(0.1)
    assert default_warmup_epochs(100, 1000) == 1.0  # at most one epoch
    assert default_warmup_epochs(10, 100) == pytest.approx(0.5)
    assert default_warmup_epochs(1, 22) == pytest.approx(20 / 22)  # at least 20 steps
    assert default_warmup_epochs(10, 3) == 1.0


def _rows(val: list[float], train: list[float]) -> list[dict[str, float]]:
    return [
        {"epoch": i + 1, "val_top1": v, "train_acc": t}
        for i, (v, t) in enumerate(zip(val, train, strict=True))
    ]


def test_chance_guard_fires_when_val_sits_at_chance_while_train_climbs() -> None:
    rows = _rows([25.0, 25.0, 27.1, 25.0], [31.0, 60.0, 80.0, 95.0])
    text = chance_warning(rows, [12, 12, 12, 12], final=False, data="folder:photos")
    assert text is not None and "sits at chance (25.0% for 4 classes" in text and "climbed to 95.0%" in text
    assert "--pretrained" in text and "--batch-size" in text and "kiln data inspect folder:photos" in text


def test_chance_guard_at_the_end_names_a_run_that_learned_nothing() -> None:
    rows = _rows([22.9, 29.2, 25.0], [26.0, 27.0, 30.0])
    assert chance_warning(rows, [12, 12, 12, 12], final=False) is None  # mid-run: not yet
    text = chance_warning(rows, [12, 12, 12, 12], final=True)
    assert text is not None and "nothing was learned" in text and "--lr" in text


def test_chance_guard_stays_quiet_on_a_run_that_learns() -> None:
    rows = _rows([40.0, 70.0, 90.0, 95.0], [40.0, 75.0, 92.0, 97.0])
    assert chance_warning(rows, [12, 12, 12, 12], final=True) is None
    # chance is the largest class's share: 75% on a 3:1 split is no better than predicting one class
    at_majority = _rows([75.0, 75.0, 75.0], [80.0, 95.0, 99.0])
    assert chance_warning(at_majority, [36, 12], final=True) is not None


def _folder(root: Path, side: int) -> None:
    for c, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (side, side), colour).save(root / c / f"{i}.png")


def test_folder_input_size_follows_data_unless_the_model_or_flag_says(tmp_path: Path) -> None:
    _folder(tmp_path, 64)
    train, _ = open_dataset(f"folder:{tmp_path}")
    s = resolve_settings(TrainConfig(data=f"folder:{tmp_path}", model="shufflenet_v2_x0_5",
                                     out=str(tmp_path / "r")), train)
    assert s.pre.size == (64, 64) and s.input_size.source == "data"
    assert s.cfg.batch_size == 8 and s.cfg.warmup_epochs == pytest.approx(1.0)  # 16 images: 2 steps an epoch
    s = resolve_settings(TrainConfig(data=f"folder:{tmp_path}", model="inception_v3",
                                     out=str(tmp_path / "r")), train)
    assert s.pre.size == (75, 75) and s.input_size.source == "model"  # inception_v3 takes 75 px at least
    s = resolve_settings(TrainConfig(data=f"folder:{tmp_path}", model="resnet18", image_size=96,
                                     out=str(tmp_path / "r")), train)
    assert s.pre.size == (96, 96) and s.input_size.source == "option"
    digits, _ = open_dataset("digits")
    s = resolve_settings(TrainConfig(out=str(tmp_path / "r")), digits)
    assert s.pre.size == (28, 28) and s.cfg.batch_size == 64  # lenet5's side; digits keeps batch 64


def test_small_detections_are_drawn_at_the_whole_factor_closest_to_256() -> None:
    res = {"boxes": [{"index": 0, "label": "a", "score": 0.9, "box": [10.0, 10.0, 50.0, 50.0]}]}
    assert render(Image.new("RGB", (160, 120)), res, ["a"]).size == (320, 240)
    assert render(Image.new("RGB", (100, 80)), res, ["a"]).size == (300, 240)
    assert render(Image.new("RGB", (300, 200)), res, ["a"]).size == (300, 200)


def test_mistyped_model_fails_before_torch_loads() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom kiln.cli import main\nrc = main(['train', '--model', 'resnt18', "
            "'--no-progress'])\n"
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"]
    assert "unknown model 'resnt18'. Did you mean 'resnet18'?" in out.stderr


def test_full_disk_is_one_line_naming_the_run_folder_and_free_space(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from kiln.cli import main
    from kiln.train import checkpoint

    def full(path: Path, obj: dict) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                           "file "
                           "data/3: file write failed")

    monkeypatch.setattr(checkpoint, "save", full)
    rc = main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"kiln train: error: the disk holding {tmp_path / 'run'} is full (")
    assert "MiB free" in err[-1]

    def enospc(path: Path, obj: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", enospc)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run2"), "--no-progress"]) == 2
    assert "is full" in capsys.readouterr().err
