"""The studio's refusals: non-loopback without a token, the token on every API call, cross-site writes,
foreign Host names, paths outside the workspace and data roots, and bodies over the limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kiln.errors import ConfigError
from kiln.studio.app import build_app
from kiln.studio.config import StudioConfig

from .conftest import WRITE

TOKEN = "s3cret-token-value"


def test_non_loopback_host_without_token_is_refused(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_STUDIO_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="--token"):
        StudioConfig.build(workspace, host="0.0.0.0")
    assert StudioConfig.build(workspace, host="0.0.0.0", token=TOKEN).token == TOKEN
    monkeypatch.setenv("KILN_STUDIO_TOKEN", TOKEN)
    assert StudioConfig.build(workspace, host="0.0.0.0").token == TOKEN


def test_cli_refuses_non_loopback_host_without_token_in_one_line(workspace: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "studio", "--workspace", str(workspace), "--host",
                          "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert (
        out.stderr.startswith("kiln studio: error: --host 0.0.0.0 is reachable")
        and out.stderr.count("\n") == 1
    )


@pytest.fixture
def token_client(workspace: Path) -> TestClient:
    cfg = StudioConfig.build(workspace, host="0.0.0.0", token=TOKEN)
    return TestClient(build_app(cfg, start_runner=False), base_url="http://studio.example:8080")


def test_every_api_call_needs_the_token(token_client: TestClient) -> None:
    with token_client as c:
        for method, path in (("GET", "/api/runs"), ("GET", "/api/info"), ("POST", "/api/runs"),
                             ("DELETE", "/api/run?run=x"),
                             ("POST", "/api/predict?run=x"), ("GET", "/api/run/events?run=x")):
            r = c.request(method, path, headers=WRITE)
            assert r.status_code == 401, (method, path)
            assert "token" in r.json()["error"]
        assert c.get("/api/runs", headers={"X-Kiln-Token": "wrong-token-value"}).status_code == 401
        assert c.get("/api/runs", headers={"X-Kiln-Token": TOKEN}).status_code == 200
        assert c.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # EventSource and links cannot set headers
        assert c.get(f"/api/runs?token={TOKEN}").status_code == 200
        # a write never takes the token from the address (it would end up in logs and history)
        assert (
            c.post(f"/api/datasets?token={TOKEN}", json={"spec": "digits"}, headers=WRITE).status_code == 401
        )
        assert c.get("/").status_code == 200  # the page itself holds no data


def test_state_changing_calls_need_the_custom_header_and_own_origin(client: TestClient) -> None:
    r = client.post("/api/datasets", json={"spec": "digits"})
    assert r.status_code == 403 and "x-kiln-studio" in r.json()["error"]
    r = client.post("/api/datasets", json={"spec": "digits"},
                    headers={**WRITE, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    r = client.post("/api/datasets", json={"spec": "digits"}, headers={**WRITE, "Origin": "http://127.0.0.1"})
    assert r.status_code == 201
    assert client.delete("/api/datasets?spec=digits").status_code == 403
    assert client.delete("/api/datasets?spec=digits", headers=WRITE).status_code == 200


def test_loopback_studio_refuses_a_foreign_host_name(client: TestClient) -> None:
    """A page whose own name was rebound to 127.0.0.1 sends its name as Host."""
    r = client.get("/api/runs", headers={"Host": "attacker.example"})
    assert r.status_code == 403
    assert client.get("/api/runs", headers={"Host": "localhost:8080"}).status_code == 200


def test_paths_outside_the_roots_are_refused(client: TestClient, workspace: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "a").mkdir(parents=True)
    for spec in (f"folder:{outside}", "folder:/etc", f"folder:{workspace}/../outside",
                 "coco:/etc/passwd:/etc"):
        r = client.post("/api/datasets", json={"spec": spec}, headers=WRITE)
        assert r.status_code == 403, spec
        assert "outside the folders" in r.json()["error"]
    (workspace / "link").symlink_to(outside)
    assert (
        client.post("/api/datasets", json={"spec": f"folder:{workspace}/link"}, headers=WRITE).status_code
        == 403
    )
    assert client.get("/api/fs", params={"path": "/etc"}).status_code == 403
    assert client.get("/api/thumb", params={"path": "/etc/passwd"}).status_code == 403
    assert client.get("/api/run", params={"run": "../outside"}).status_code == 403
    assert client.post("/api/runs", json={"data": f"folder:{outside}"}, headers=WRITE).status_code == 403
    assert client.post("/api/runs", json={"name": "../escape"}, headers=WRITE).status_code == 400
    (workspace / "runs" / "r").mkdir(parents=True)
    (workspace / "runs" / "r" / "kiln.json").write_text("{}")
    r = client.get("/api/download", params={"run": "runs/r", "file": "../../../outside/a"})
    assert r.status_code == 403


def test_form_values_never_become_flags(client: TestClient) -> None:
    r = client.post("/api/train/command", json={"model": "--epochs=99", "epochs": 1, "name": "x"},
                    headers=WRITE)
    assert r.status_code == 200
    assert r.json()["argv"] == ["train", "--model=--epochs=99", "--epochs=1", "--out=runs/x"]
    r = client.post("/api/train/command", json={"epochs": 0}, headers=WRITE)
    assert r.status_code == 400 and "--epochs" in r.json()["error"]
    r = client.post("/api/train/command", json={"shell": "rm -rf /"}, headers=WRITE)
    assert r.status_code == 400 and "unknown field shell" in r.json()["error"]


def test_bodies_over_the_limit_are_refused(workspace: Path) -> None:
    cfg = StudioConfig.build(workspace, max_upload_bytes=1000)
    with TestClient(build_app(cfg, start_runner=False), base_url="http://127.0.0.1") as c:
        r = c.post("/api/predict?run=x", files={"files": ("a.png", b"\0" * 5000)}, headers=WRITE)
        assert r.status_code == 413 and "limit" in r.json()["error"]

        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"\0" * 500

        r = c.post("/api/datasets", content=chunks(), headers={**WRITE, "Content-Type": "application/json"})
        assert r.status_code == 413
