"""Argument mistakes of ``kiln train`` end before torch is imported: a mistyped model, a dataset path that
is not there, a bad number, ``--pretrained`` weights that are not cached while their host is unreachable.

The command runs in a subprocess whose ``torch`` is poisoned (torchvision imports it first thing): importing
it leaves a marker file and fails, so the error must come from the checks made before it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import CheckpointError
from kiln.train import early

POISON = """
import os, pathlib
pathlib.Path(os.environ["KILN_TEST_POISON_MARK"]).write_text(__name__)
raise ImportError(f"{__name__} was imported")
"""


def _kiln_train(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True, exist_ok=True)
    (poison / "torch" / "__init__.py").write_text(POISON)
    mark = tmp_path / "imported.txt"
    path = os.pathsep.join(p for p in (str(poison), os.environ.get("PYTHONPATH", "")) if p)
    run_env = {**os.environ, "PYTHONPATH": path, "KILN_TEST_POISON_MARK": str(mark), **env}
    run_env.pop("KILN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "train", *args], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=300)
    return proc, mark


def _one_line_error(proc: subprocess.CompletedProcess[str], mark: Path) -> str:
    assert not mark.exists(), f"{mark.read_text()} was imported before the error: {proc.stderr[-2000:]}"
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln train: error: "), proc.stderr
    return lines[0]


def test_mistyped_model_is_named_with_the_nearest_before_torch_loads(tmp_path: Path) -> None:
    line = _one_line_error(*_kiln_train(tmp_path, "--model", "resnt18", "--data", "digits"))
    assert "unknown model 'resnt18'" in line and "Did you mean 'resnet18'" in line


@pytest.mark.parametrize(("data", "expected"), [
    ("folder:no_such_dir", "folder no_such_dir does not exist; use folder:DIR"),
    ("coco:missing.json:images", "file missing.json does not exist"),
    ("yolo:missing.yaml", "file missing.yaml does not exist"),
    ("foldr:photos", "unknown dataset 'foldr'"),
    ("folder", "'folder' is not valid; use folder:DIR"),
])
def test_bad_data_is_reported_before_torch_loads(tmp_path: Path, data: str, expected: str) -> None:
    line = _one_line_error(*_kiln_train(tmp_path, "--data", data))
    assert expected in line


@pytest.mark.parametrize(("args", "expected"), [
    (("--epochs", "0"), "must be >= 1, got 0"),
    (("--lr", "fast"), "expected a number, got 'fast'"),
    (("--weights", "nowhere.pt"), "--weights: no file nowhere.pt"),
])
def test_bad_numbers_and_files_are_reported_before_torch_loads(tmp_path: Path, args: tuple[str, ...],
                                                               expected: str) -> None:
    line = _one_line_error(*_kiln_train(tmp_path, *args))
    assert expected in line


def _online(host: str = "download.pytorch.org") -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@pytest.mark.skipif(_online(), reason="download.pytorch.org resolves here: the offline case cannot be shown")
def test_pretrained_offline_names_the_file_the_cache_and_how_to_fill_it_before_torch_loads(
    tmp_path: Path,
) -> None:
    home = tmp_path / "torch_home"
    line = _one_line_error(*_kiln_train(tmp_path, "--model", "resnet18", "--pretrained", "--data", "digits",
                                        TORCH_HOME=str(home)))
    folder = home / "hub" / "checkpoints"
    assert f"resnet18-f37072fd.pth is not in torch.hub's cache ({folder})" in line
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in line and "--weights" in line


def test_pretrained_in_the_cache_passes_the_early_check_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(early, "unreachable", lambda host, port=443: "gaierror: no network")
    with pytest.raises(CheckpointError, match="mobilenet_v3_small-047dcff4.pth"):
        early.check_pretrained_offline("mobilenet_v3_small", "DEFAULT")
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "mobilenet_v3_small-047dcff4.pth").write_bytes(b"x")
    early.check_pretrained_offline("mobilenet_v3_small", "DEFAULT")  # cached: nothing to fetch
    early.check_pretrained_offline("timm:resnet18", "DEFAULT")  # left to the full check
    early.check_pretrained_offline("lenet5", "DEFAULT")


def test_torch_hub_dir_is_torch_hubs_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert early.torch_hub_dir() == Path(torch.hub.get_dir())


@pytest.mark.parametrize(("arch", "which"), [
    ("resnet18", "DEFAULT"), ("resnet50", "IMAGENET1K_V2"), ("resnet50", "ResNet50_Weights.IMAGENET1K_V1"),
    ("mobilenet_v3_small", "DEFAULT"), ("efficientnet_b0", "DEFAULT"), ("convnext_tiny", "DEFAULT"),
    ("shufflenet_v2_x0_5", "DEFAULT"), ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),
])
def test_weights_url_read_from_source_is_torchvisions(arch: str, which: str) -> None:
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    assert early.weights_url(arch, which) == enum[which.rsplit(".", 1)[-1]].url


def test_unknown_weights_name_is_left_to_the_full_check() -> None:
    assert early.weights_url("resnet18", "IMAGENET1K_V9") is None
    assert early.weights_url("no_such_arch", "DEFAULT") is None


def test_each_command_is_registered_by_the_stage_the_cli_imports_for_it() -> None:
    import argparse
    import importlib

    from kiln import cli

    registered: dict[str, str] = {}
    for module in cli.STAGES:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).register(sub)
        registered.update(dict.fromkeys(sub.choices, module))
    assert registered == cli.COMMANDS
    args = cli.build_parser(["-v", "data", "shapes", "--out",
                             "x"]).parse_args(["-v", "data", "shapes", "--out", "x"])
    assert args.command == "data" and args.out == "x"
