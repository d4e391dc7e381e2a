"""`make lab`: JupyterLab starts, as root too (containers, cloud images), prints its URL with the token it
generated, and serves the notebooks through its contents API with that token.

The tests call the Makefile's own target with BIN pointing at this interpreter's environment and
`-o .venv/.installed` (the setup step is `make test`'s business, not this test's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")
BIN = Path(sys.executable).parent


def make_lab(*lab_args: str, dry_run: bool = False) -> list[str]:
    return [MAKE, "-s", *(["-n"] if dry_run else []), "-o", ".venv/.installed", "lab", f"BIN={BIN}",
            "LAB_ARGS=" + " ".join(lab_args)]


def test_allow_root_is_added_only_for_root():
    recipe = subprocess.run(make_lab("--no-browser", dry_run=True), cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    assert recipe.startswith(f"{BIN}/jupyter lab --notebook-dir=. ")
    assert ("--allow-root" in recipe.split()) == (os.geteuid() == 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


@pytest.mark.slow
def test_make_lab_serves_the_lab_and_a_notebook_with_its_token(tmp_path):
    port = free_port()
    log_path = tmp_path / "lab.log"
    # runtime files (connection info, the browser-open page) go to the test's folder, not ~/.local
    env = os.environ | {"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    cmd = make_lab("--no-browser", f"--port={port}", "--ServerApp.port_retries=0")
    with open(log_path, "w") as log:
        # its own process group: make and the server it starts are stopped together
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        url = re.compile(rf"http://127\.0\.0\.1:{port}/lab\?token=([0-9a-f]{{32,}})")
        deadline = time.monotonic() + 50
        while not url.search(output := log_path.read_text()):
            assert server.poll() is None, "make lab exited:\n" + output[-3000:]
            assert time.monotonic() < deadline, "no URL with a token after 50 s:\n" + output[-3000:]
            time.sleep(0.5)
        token = url.search(output).group(1)
        assert "Running as root is not recommended" not in output

        status, page = get(f"{base}/lab?token={token}")
        assert status == 200 and b"JupyterLab" in page
        name = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))[0]
        status, body = get(f"{base}/api/contents/notebooks/{name}", token)
        assert status == 200
        served = json.loads(body)
        assert served["type"] == "notebook" and served["name"] == name
        on_disk = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        assert [c["source"] for c in served["content"]["cells"]] == [c["source"] for c in on_disk.cells]
        assert get(f"{base}/api/contents/notebooks/{name}")[0] == 403  # the token is what lets us in
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    deadline = time.monotonic() + 20  # make has exited; the server it started must be gone too
    while True:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            pytest.fail("the server outlived make lab by 20 s")
        time.sleep(0.2)
