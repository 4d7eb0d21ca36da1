"""Two "nodes" on loopback: two torchrun launchers, each with the command docs/train.md shows for one
node of a multi-node run, train one model; only global rank 0 writes a run folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.bundle import Bundle

TRAIN = ["-m", "kiln.cli", "train", "--data", "digits", "--model", "lenet5", "--epochs", "1", "--no-progress",
         "--json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _unused_port() -> int:
    """A port nothing listens on now, for the rendezvous both launchers must be told in advance."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rendezvous(form: str, port: int, node: int) -> list[str]:
    if form == "c10d":
        return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                "kiln-loopback"]
    return ["--master-addr", "127.0.0.1", "--master-port", str(port), "--node-rank", str(node)]


@pytest.mark.parametrize("form", ["c10d", pytest.param("static", marks=pytest.mark.slow)])
def test_two_nodes_on_loopback_make_one_bundle_written_by_rank_0(tmp_path: Path, form: str):
    port = _unused_port()
    # each "node" gets its own --out, as each machine has its own disk: only rank 0's is written
    outs = [tmp_path / f"node{i}" / "run" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "1",
                               *_rendezvous(form, port, i), *TRAIN, "--out", str(outs[i])],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.communicate()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    written = [out for out in outs if out.exists()]
    assert len(written) == 1, [sorted(p.name for p in out.parent.rglob("*")) for out in outs]
    if form == "static":
        assert written == [outs[0]]  # --node-rank 0 holds global rank 0
    summaries = [json.loads(out) for out, _ in results if out.strip()]
    assert len(summaries) == 1 and summaries[0]["run_dir"] == str(written[0])  # only rank 0 reports
    training = Bundle.load(written[0]).manifest.training
    assert training["world_size"] == 2 and training["epochs"] == 1
    torch.load(written[0] / "model.pt", weights_only=True)
