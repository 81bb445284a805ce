"""The launched UI over real HTTP on loopback (`python launch.py --listen --auth-file ...`): without a login every
API route, upload and file download is refused (401); with one, files are served from the outputs folder only and
an upload over --max-upload-mb is refused by Gradio itself (413)."""
from __future__ import annotations

import http.cookiejar
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.test_launch import ROOT, free_port

USER, PASSWORD = "alice", "correct horse"


class Client:
    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def login(self, user: str, password: str) -> int:
        return self.request("/login", urllib.parse.urlencode({"username": user, "password": password}).encode())[0]

    def upload(self, name: str, payload: bytes) -> tuple[int, bytes]:
        body = (f'--XB\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + payload + b"\r\n--XB--\r\n"
        return self.request("/gradio_api/upload", body, {"Content-Type": "multipart/form-data; boundary=XB"})


def start_ui(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ui = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), *flags], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, end = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        assert ui.poll() is None, ui.communicate()[0]
        assert time.monotonic() < end, "the UI never answered"
        try:
            urllib.request.urlopen(base + "/", timeout=5).read()
            return ui, base
        except OSError:
            time.sleep(0.5)


def stop_ui(ui: subprocess.Popen) -> str:
    if ui.poll() is None:
        ui.terminate()
    try:
        return ui.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        ui.kill()
        return ui.communicate()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    outputs = tmp / "outputs"
    (outputs / "run").mkdir(parents=True)
    (outputs / "run" / "lora.safetensors").write_bytes(b"adapter bytes")
    logins = tmp / "logins"
    logins.write_text(f"# who may use it\n{USER}:{PASSWORD}\n", encoding="utf-8")
    ui, base = start_ui(tmp, "--listen", "--auth-file", str(logins), "--outputs", str(outputs),
                        "--max-upload-mb", "0.01")
    yield base, outputs
    stop_ui(ui)


def test_without_a_login_every_route_is_refused(server):
    base, outputs = server
    anon = Client(base)
    file_route = "/gradio_api/file=" + urllib.parse.quote(str(outputs / "run" / "lora.safetensors"))
    call = json.dumps({"data": []}).encode()
    for path, data in (("/config", None), ("/gradio_api/info", None), (file_route, None),
                       ("/gradio_api/queue/status", None), ("/gradio_api/call/on_render", call),
                       ("/gradio_api/queue/join", call), ("/gradio_api/run/predict", call)):
        status, body = anon.request(path, data)
        assert status == 401, (path, status, body[:200])
        assert b"Not authenticated" in body
    assert anon.upload("a.png", b"0" * 10)[0] == 401
    assert anon.login(USER, "wrong") in (400, 401)
    assert anon.request(file_route)[0] == 401                 # a failed login opens nothing


def test_with_a_login_files_come_only_from_the_outputs_folder_and_big_uploads_are_refused(server):
    base, outputs = server
    me = Client(base)
    assert me.login(USER, PASSWORD) == 200
    status, info = me.request("/gradio_api/info")
    assert status == 200 and json.loads(info)["named_endpoints"]
    status, body = me.request("/gradio_api/file=" + urllib.parse.quote(str(outputs / "run" / "lora.safetensors")))
    assert (status, body) == (200, b"adapter bytes")
    for elsewhere in (ROOT / "README.md", ROOT / "trainer" / "config.py", Path("/etc/hostname")):
        status, body = me.request("/gradio_api/file=" + urllib.parse.quote(str(elsewhere)))
        assert status == 403, (elsewhere, status, body[:200])
    status, body = me.upload("big.png", b"0" * 20_000)         # over --max-upload-mb 0.01 (10,485 bytes)
    assert status == 413 and b"maximum allowed size" in body
    status, body = me.upload("small.png", b"0" * 1000)
    assert status == 200, body[:200]
