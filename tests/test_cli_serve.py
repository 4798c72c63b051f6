"""`deploylab serve`: the real command in a subprocess, a real image with the printed token, Ctrl-C.

Starts the CLI exactly as a user would (`deploylab serve --profile smoke`), reads the inference URL,
the key file and the curl command it prints, predicts one real test image with the printed token,
renews the inference token through TorchServe's token API, sends SIGINT, and checks that the
command exits 0 and leaves no TorchServe process (Java frontend or Python worker) behind.

The CLI is started with SIGINT *ignored*, as a background job of a non-interactive shell starts
(`nohup make test &`, some CI runners): Ctrl-C must stop it whatever disposition it inherited.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deploylab import config, data
from deploylab.serving import protocol, torchserve

JAVA = torchserve.java_problem()
pytestmark = pytest.mark.skipif(JAVA is not None, reason=f"TorchServe cannot run here: {JAVA}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _torchserve_processes(workdir: str) -> list[psutil.Process]:
    """Processes whose command line names this server's working folder (frontend and workers)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if workdir in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _ignore_sigint() -> None:
    """In the child before exec: SIGINT ignored, as a background job of a non-interactive shell inherits it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def cli_server():
    """The CLI running in its own process group; yields (process, lines read so far, reader)."""
    env = {**os.environ, "DEPLOYLAB_PROFILE": "smoke", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deploylab.cli", "serve", "--profile", "smoke"], cwd=config.ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_ignore_sigint)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[psutil.Process] = []
    try:
        yield proc, lines, reader, seen
    finally:
        if proc.poll() is None:  # the test failed before its SIGINT: do not leave a server behind
            seen += _descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for p in [*_descendants(proc.pid), *seen]:
                    p.kill()
                proc.kill()


def _wait_for(lines: list[str], pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lines:
            m = re.search(pattern, line)
            if m:
                return m
        if proc.poll() is not None:
            time.sleep(0.5)  # let the reader drain the output
            pytest.fail(f"`deploylab serve` exited with {proc.returncode} before printing {pattern!r}:\n" + "\n".join(lines[-40:]))
        time.sleep(0.2)
    pytest.fail(f"`deploylab serve` did not print {pattern!r} within {timeout:.0f} s:\n" + "\n".join(lines[-40:]))


def test_cli_serve_predicts_with_the_printed_token_and_stops_on_ctrl_c(cli_server):
    proc, lines, reader, seen = cli_server
    url = _wait_for(lines, r"inference URL: (http://127\.0\.0\.1:\d+/predictions/student)$", proc, 240).group(1)
    key_file = Path(_wait_for(lines, r"key file: (\S+)", proc, 10).group(1))
    curl_line = _wait_for(lines, r"^\s+curl .*--data-binary.*", proc, 10).group(0)
    _wait_for(lines, r"press Ctrl-C to stop", proc, 10)
    seen += _descendants(proc.pid)
    workdir = str(key_file.parent)
    assert _torchserve_processes(workdir), "no TorchServe process runs from the printed working folder"

    # the printed curl command is well-formed and carries the token of the key file
    argv = shlex.split(curl_line)
    token = argv[argv.index("-H") + 1].removeprefix("Authorization: Bearer ")
    keys = json.loads(key_file.read_text())
    assert token == keys["inference"]["key"]
    assert argv[-1] == url and Path(argv[argv.index("--data-binary") + 1].lstrip("@")).is_file()

    # one real test image, sent as the curl command would send it
    ds = data.load_fashion_mnist()
    image = ds.test_images[0]
    r = httpx.post(url, content=protocol.png_bytes(image), headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
                   timeout=60)
    assert r.status_code == 200, r.text
    top = r.json()["predictions"]
    assert top[0]["label"] == data.CLASS_NAMES[top[0]["index"]] and 0.0 <= top[0]["probability"] <= 1.0
    assert httpx.post(url, content=protocol.png_bytes(image), timeout=60).status_code in (400, 401, 403), "no token must be refused"

    # the printed token renewal (the inference key expires after 60 minutes): a new key, the old one refused
    renew = shlex.split(_wait_for(lines, r"^\s+curl .*/token\?type=inference.*", proc, 10).group(0))
    r = httpx.get(renew[-1], headers=dict([renew[renew.index("-H") + 1].split(": ", 1)]), timeout=30)
    assert r.status_code == 200, r.text
    new_token = json.loads(key_file.read_text())["inference"]["key"]
    assert new_token != token
    ok = httpx.post(url, content=protocol.png_bytes(image), headers={"Authorization": f"Bearer {new_token}"}, timeout=60)
    old = httpx.post(url, content=protocol.png_bytes(image), headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert ok.status_code == 200 and old.status_code in (400, 401, 403), (ok.status_code, old.status_code)
    token = new_token

    # SIGINT, as Ctrl-C in the terminal sends it: a clean exit and nothing left behind
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=90) == 0, "\n".join(lines[-30:])
    reader.join(timeout=10)
    assert any("stopped: no TorchServe process left" in line for line in lines), "\n".join(lines[-30:])
    psutil.wait_procs([p for p in seen if p.is_running()], timeout=10)
    left = [p.pid for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of `deploylab serve` survived Ctrl-C: {left}"
    assert not _torchserve_processes(workdir), "a TorchServe process of this server is still running"
    with pytest.raises(httpx.HTTPError):
        httpx.post(url, content=protocol.png_bytes(image), headers={"Authorization": f"Bearer {token}"}, timeout=5)


def test_the_cli_is_started_as_a_background_job_would_be():
    """The fixture's child really starts with SIGINT ignored (else the test above would not cover that case)."""
    out = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"],
                         capture_output=True, text=True, preexec_fn=_ignore_sigint, timeout=60, check=True).stdout
    assert out.strip() == "True", out
