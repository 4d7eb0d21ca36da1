"""The load generator against a tiny HTTP server on 127.0.0.1 (tests/bench/fake_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.bench.loadgen import LoadConfig, run_load
from kiln.bench.report import load_table
from kiln.bench.server import ServerError, native_request, noise_png
from kiln.cli import main
from kiln.errors import ConfigError

from .fake_server import MODEL, FakeState, fake_server


def test_closed_loop_counts_errors_by_status_and_reads_server_batches() -> None:
    state = FakeState(fail_every=4, fail_status=503)
    with fake_server(state) as url:
        report = run_load(LoadConfig(url=url, model=MODEL, concurrency=[1, 4], duration=0.4, warmup=3))
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    assert state.bad_bodies == 0  # every request carried a decodable PNG
    total_ok = total_503 = 0
    for lv in report["levels"]:
        assert lv["requests"] == lv["ok"] + sum(lv["errors"].values()) > 0
        assert set(lv["errors"]) <= {"503"}
        assert lv["latency_ms"]["count"] == lv["ok"]
        assert lv["requests_per_s"] == pytest.approx(lv["requests"] / lv["elapsed_s"])
        assert 0 <= lv["client_cpu_fraction"] < 4
        # The server observes a batch per successful request; warm-up happens before the first scrape.
        sb = lv["server_batch_size"]
        assert sb["batches"] == lv["ok"] and sb["mean"] == 1.0
        assert sb["distribution"] == [{"le": "1.0", "range": "1", "batches": lv["ok"]}]
        total_ok += lv["ok"]
        total_503 += lv["errors"].get("503", 0)
    warmup = 2 * 3
    assert state.calls == total_ok + total_503 + warmup
    assert state.statuses[503] == state.calls // 4
    assert state.statuses[503] - warmup <= total_503 <= state.statuses[503]
    header, rows, notes = load_table(report)
    assert [r[0] for r in rows] == ["c=1", "c=4"]
    assert all(r[7] == f"503:{lv['errors']['503']}" for r, lv in zip(rows, report["levels"], strict=True)
               if lv["errors"])
    assert total_503 > 0
    assert any("server batch sizes" in n for n in notes)


def test_open_loop_poisson_and_multipart() -> None:
    state = FakeState()
    with fake_server(state) as url:
        cfg = LoadConfig(url=url, model=MODEL, rate=80, duration=0.5, warmup=0, encoding="multipart",
                         images_per_request=2)
        report = run_load(cfg)
    (lv,) = report["levels"]
    assert lv["mode"] == "rate" and lv["rate"] == 80
    # Poisson arrivals over 0.5 s at 80/s: 40 expected; the bound is loose, the count must be plausible.
    assert 15 <= lv["requests"] <= 70
    assert lv["errors"] == {} and lv["dropped"] == 0
    assert lv["server_batch_size"]["mean"] == 2.0  # two files per multipart request
    assert lv["schedule_lag_ms"]["count"] == lv["requests"]
    assert state.bad_bodies == 0


def test_v2_protocol_sends_a_tensor_of_the_metadata_shape() -> None:
    state = FakeState()
    with fake_server(state) as url:
        report = run_load(LoadConfig(url=url, model=MODEL, protocol="v2", concurrency=[2], duration=0.3,
                                     warmup=0))
    (lv,) = report["levels"]
    assert lv["ok"] > 0 and lv["errors"] == {} and state.bad_bodies == 0
    assert report["server"]["parameters"]["backend"] == "fake"


def test_client_errors_are_counted_not_raised() -> None:
    state = FakeState(fail_every=1, fail_status=500)
    with fake_server(state) as url:
        report = run_load(LoadConfig(url=url, model=MODEL, concurrency=[2], duration=0.2, warmup=0))
    (lv,) = report["levels"]
    assert lv["ok"] == 0 and lv["errors"]["500"] == lv["requests"] > 0
    assert lv["latency_ms"] is None
    assert lv["server_batch_size"]["batches"] == 0


def test_api_key_is_sent_to_every_route(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    state = FakeState(api_key="s3cret")
    with fake_server(state) as url:
        good = run_load(LoadConfig(url=url, model=MODEL, concurrency=[1], duration=0.2, warmup=0,
                                   api_key="s3cret"))
        monkeypatch.setenv("KILN_API_KEY", "s3cret")
        assert main(["bench", "--url", url, "--model", MODEL, "--concurrency", "1", "--duration", "0.1",
                     "--warmup", "0"]) == 0
        monkeypatch.delenv("KILN_API_KEY")
        # Without the key the metadata read is refused too: requests go out and are counted as 401.
        bad = run_load(LoadConfig(url=url, model=MODEL, concurrency=[1], duration=0.2, warmup=0))
    (lv,) = good["levels"]
    assert lv["errors"] == {} and lv["server_batch_size"]["batches"] == lv["ok"] > 0
    assert good["config"]["api_key"] == "***"
    (lv,) = bad["levels"]
    assert lv["ok"] == 0 and lv["errors"]["401"] == lv["requests"] > 0
    assert lv["metrics_note"] == "/metrics answered 401"
    assert "s3cret" not in capsys.readouterr().out


def test_unknown_model_and_unreachable_server(free_port: int) -> None:
    with fake_server(FakeState()) as url, pytest.raises(ServerError, match="no model 'other'"):
        run_load(LoadConfig(url=url, model="other", concurrency=[1], duration=0.1, warmup=0))
    with pytest.raises(ServerError, match="cannot reach"):
        run_load(LoadConfig(url=f"http://127.0.0.1:{free_port}", model="m", concurrency=[1], duration=0.1))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="not both"):
        LoadConfig(url="http://127.0.0.1:1", model="m", concurrency=[1], rate=5)
    with pytest.raises(ConfigError, match="http://"):
        LoadConfig(url="127.0.0.1:1", model="m")
    with pytest.raises(ConfigError, match="native protocol"):
        LoadConfig(url="http://127.0.0.1:1", model="m", protocol="v2", image="x.png")
    assert LoadConfig(url="http://127.0.0.1:1/", model="m").concurrency == [1, 8, 32, 64]


def test_request_bodies() -> None:
    png = noise_png(8, 8, 1)
    assert png.startswith(b"\x89PNG")
    req = native_request("m", png, n=3)
    assert req.path == "/v1/models/m/predict" and len(json.loads(req.content)["images"]) == 3
    multi = native_request("m", png, n=2, encoding="multipart")
    assert multi.content_type.startswith("multipart/form-data; boundary=")
    assert multi.content.count(b'name="file"') == 2


def test_cli_server_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(noise_png(16, 16))
    out = tmp_path / "load.json"
    with fake_server(FakeState()) as url:
        code = main(["bench", "--url", url, "--model", MODEL, "--concurrency", "1,2", "--duration", "0.2",
                     "--warmup", "0", "--image", str(image), "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "c=1" in text and "c=2" in text and "server batch sizes" in text
    data = json.loads(out.read_text())
    assert data["mode"] == "server" and len(data["levels"]) == 2
    assert data["config"]["image"] == str(image) and data["environment"]["cpu"]
