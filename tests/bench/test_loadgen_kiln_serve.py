"""The load generator against the real kiln server (kiln.serve.app under uvicorn) on 127.0.0.1:
the routes, the v2 metadata and the `kiln_batch_size` histogram it relies on are the server's own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.bench.loadgen import LoadConfig, run_load

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def kiln_server(tiny_bundle: Path) -> Iterator[str]:
    import socket

    from kiln.serve.app import create_app
    from kiln.serve.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app([("tiny", tiny_bundle)], Settings(backend="onnxrt", max_batch=4, max_delay_ms=5))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        server.should_exit = True
        pytest.fail("kiln server did not become ready in 60 s")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("protocol", ["native", "v2"])
def test_load_against_kiln_serve(kiln_server: str, protocol: str) -> None:
    report = run_load(LoadConfig(url=kiln_server, model="tiny", protocol=protocol, concurrency=[1, 4],
                                 duration=0.5, warmup=2))
    assert report["server"]["parameters"]["backend"] == "onnxrt"
    for lv in report["levels"]:
        assert lv["errors"] == {} and lv["ok"] > 0
        sb = lv["server_batch_size"]
        assert sb is not None and sb["metric"] == "kiln_batch_size"
        # One image per request: the server batched exactly the images the generator sent.
        assert sb["items"] == lv["ok"]
        assert 1 <= sb["batches"] <= lv["ok"]
    assert report["levels"][0]["server_batch_size"]["mean"] == 1.0  # concurrency 1: nothing to batch with
