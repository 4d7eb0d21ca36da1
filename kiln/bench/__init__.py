"""Benchmarks: a bundle's backends timed in-process (``kiln bench BUNDLE``) and a load generator for a
running server (``kiln bench --url``).

    stats        percentiles and summaries of latency samples
    environment  CPU, GPU, library versions, load average: what every figure is printed beside
    engine       timing one backend in-process (warm-up, synchronize, time_backend); imports no backend
    sweep        ``kiln bench BUNDLE``: every backend x precision x batch of a bundle, with the baseline
    client       a lean keep-alive HTTP/1.1 client on asyncio streams
    server       the server under test: metadata, request bodies, the /metrics batch histogram
    worker       one client process's part of a load level, and the client processes
    loadgen      the load generator: closed and open loops over one or more client processes
    report       tables, the JSON report, the engine plot
    cli          the ``kiln bench`` command (the only module here that imports kiln.cli)
"""

from kiln.bench.engine import time_backend

__all__ = ["time_backend"]
