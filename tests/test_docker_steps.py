"""The Dockerfile without a Docker engine: its RUN steps run in a fresh venv on this machine (container paths
mapped into a temporary directory, as a volume would be), then its ENTRYPOINT starts the server on a tiny model
with the image's ENV (host and port overridden to a free loopback port, as `docker run -e` would), and the
image's own HEALTHCHECK command passes. Steps that change the system (apt-get, useradd) are not run here; the
test checks what they are for instead (a non-root USER, a C compiler and python3 for the CUDA base image).

Slow (a venv with torch, about 1-2 minutes): pip resolves from the package index, like `docker build`."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
CONTAINER_ROOTS = ("/opt/venv", "/data", "/app")     # every absolute path the Dockerfile uses
SYSTEM_COMMANDS = ("apt-get", "useradd")            # steps that change this machine: not run
TINY_MODEL = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                  vocab_size=1024, max_position_embeddings=512)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) for each instruction, continuation lines joined, comments dropped."""
    joined, lines = [], []
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            lines.append(line.rstrip()[:-1])
            continue
        joined.append(" ".join(part.strip() for part in [*lines, line]))
        lines = []
    return [(entry.split(None, 1)[0].upper(), entry.split(None, 1)[1]) for entry in joined]


class Image:
    """What the Dockerfile says, with container paths mapped under `root`."""

    def __init__(self, dockerfile: Path, root: Path):
        self.root = root
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.steps: list[tuple[str, str]] = instructions(dockerfile.read_text())
        for kind, rest in self.steps:
            if kind == "ARG":
                name, _, default = rest.partition("=")
                self.args[name] = default

    def map(self, text: str) -> str:
        for prefix in CONTAINER_ROOTS:
            text = text.replace(prefix, str(self.root / prefix.lstrip("/")))
        return text

    def expand(self, text: str, env: dict[str, str]) -> str:
        """${NAME} / $NAME from the build args, then `env`."""
        values = {**env, **self.args}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)

    def first(self, kind: str) -> str:
        return next(rest for k, rest in self.steps if k == kind)

    def all(self, kind: str) -> list[str]:
        return [rest for k, rest in self.steps if k == kind]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    return Image(REPO / "Dockerfile", tmp_path_factory.mktemp("container"))


def test_dockerfile_says_what_an_operator_needs(image):
    text = (REPO / "Dockerfile").read_text()
    assert "--index-url" not in text and "--extra-index-url" not in text     # only the package index
    assert image.args["TORCH"] == "torch==2.13.0"
    assert image.args["BASE_IMAGE"] and image.first("FROM") == "${BASE_IMAGE}"
    pip_steps = [r for r in image.all("RUN") if "pip install" in r]
    assert any("-c requirements.lock" in r for r in pip_steps)
    assert "requirements.lock" in " ".join(image.all("COPY"))
    kinds = [k for k, _ in image.steps]
    user = image.all("USER")
    assert user and user[-1] not in ("root", "0") and kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert any(r.startswith("useradd") and user[-1] in r for r in image.all("RUN"))
    assert set(json.loads(image.first("VOLUME"))) == {"/data/cache", "/data/adapters"}
    assert "/health" in image.first("HEALTHCHECK")
    system = [r for r in image.all("RUN") if r.split()[0] in SYSTEM_COMMANDS]
    assert any("gcc" in r and "python3-venv" in r for r in system)      # Triton's compiler; CUDA images' Python


def test_run_steps_in_a_fresh_venv_then_entrypoint_answers_health(image, tmp_path):
    from server.demo import ensure_demo_model
    root = image.root
    model = ensure_demo_model(tmp_path / "tiny-llama", **TINY_MODEL)
    shim = tmp_path / "bin"                    # `python3` in the steps: the interpreter this suite runs on
    shim.mkdir()
    (shim / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith("PEFTSERVE_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    base_env["PATH"] = os.pathsep.join([str(shim)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                                       if not p.startswith(str(REPO))])
    env = dict(base_env)
    workdir = root
    for kind, rest in image.steps:
        if kind == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = image.map(image.expand(value, env))
        elif kind == "WORKDIR":
            workdir = Path(image.map(rest))
            workdir.mkdir(parents=True, exist_ok=True)
        elif kind == "COPY":                  # COPY SRC... DEST/ (into DEST) or COPY SRC DEST (as DEST)
            *sources, dest = shlex.split(rest)
            into = dest.endswith("/") or len(sources) > 1
            for source in sources:
                target = workdir / dest / Path(source).name if into else workdir / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / source, target)
        elif kind == "RUN" and rest.split()[0] not in SYSTEM_COMMANDS:
            command = image.map(image.expand(rest, env))
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"RUN {rest}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert Path(env["VIRTUAL_ENV"], "bin", "peftserve").is_file()
    assert (root / "data" / "cache").is_dir() and (root / "data" / "adapters").is_dir()

    # docker run -e PEFTSERVE_HOST=127.0.0.1 -e PEFTSERVE_PORT=... -e PEFTSERVE_KV_CACHE_MEMORY=1MiB IMAGE --model ...
    port = free_port()
    env.update(PEFTSERVE_HOST="127.0.0.1", PEFTSERVE_PORT=str(port), PEFTSERVE_KV_CACHE_MEMORY="1MiB")
    entrypoint = json.loads(image.first("ENTRYPOINT"))
    process = subprocess.Popen([*entrypoint, "--model", model], cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert shutil.which(entrypoint[0], path=env["PATH"]).startswith(str(root))     # the fresh venv's
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        answer = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2,
                                                           "ignore_eos": True}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        check = image.map(image.first("HEALTHCHECK").split(" CMD ", 1)[1])
        result = subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        process.send_signal(signal.SIGTERM)                  # docker stop
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate(timeout=30)[0]
    assert "serving http://127.0.0.1:%d/v1 | model 'tiny-llama'" % port in output
    assert f"just in time from {root / 'data' / 'adapters'}" in output


def test_compose_example_mounts_the_image_volumes_and_sets_real_options(image):
    import yaml

    from server.cli import build_parser
    from server.settings import env_name, options_of
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    service = compose["services"]["peftserve"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert set(mounts) == set(json.loads(image.first("VOLUME")))
    assert (REPO / "deploy" / mounts["/data/adapters"]).is_dir()                 # the adapter directory
    assert mounts["/data/cache"] in compose["volumes"]                          # a named volume
    known = {env_name(dest) for dest in options_of(build_parser()[1])}
    assert set(service["environment"]) <= known, set(service["environment"]) - known
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > int(service["environment"]["PEFTSERVE_DRAIN_TIMEOUT"])     # drains before SIGKILL
    assert (REPO / "deploy" / service["build"]["context"] / "Dockerfile").is_file()
