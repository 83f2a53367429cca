"""The explorer over real HTTP (uvicorn on 127.0.0.1, a free port, a tiny model): only its own page may change
anything (issue 28, item 1: Origin check + per-server token on every state-changing endpoint), jobs can be
cancelled with the weights restored exactly, busy answers instead of waits, and a clean Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from helpers import same, snapshot, tiny

from kvedit.cli.explore import bind_socket
from kvedit.explore import ExploreSession, ExploreSettings, create_app
from kvedit.explore.limits import Limits
from kvedit.explore.security import loopback_origins

PROMPT = "the eiffel tower is located in the city of"
EDIT = {
    "prompt": PROMPT,
    "subject": "the eiffel tower",
    "target_new": "rome",
    "target_true": "paris",
    "method": "ft-keys",
    "layers": [1],
    "lr": 0.01,
    "max_steps": 4,
}
#: an edit that runs until it is cancelled: a learning rate too small to reach the early stop in 10^5 steps
ENDLESS = EDIT | {"lr": 1e-12, "max_steps": 100_000}


@dataclass
class Server:
    url: str
    session: ExploreSession
    token: str
    http: httpx.Client

    def send(
        self, method: str, path: str, origin: str | None = "own", token: str | None = "own", **kw
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if origin is not None:
            headers["Origin"] = self.url if origin == "own" else origin
        if token is not None:
            headers["X-Kvedit-Token"] = self.token if token == "own" else token
        return self.http.request(method, self.url + path, headers=headers, **kw)

    def wait_job(self, job_id: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.http.get(f"{self.url}/api/jobs/{job_id}").json()
            if job["state"] not in ("queued", "running") or time.monotonic() > deadline:
                return job
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    import uvicorn

    session = ExploreSession(
        tiny("llama"),
        ExploreSettings(mine_tokens=200, mine_k=5, prefetch_values=False, limits=Limits(max_steps=100_000)),
    )
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(session, allowed_hosts=["127.0.0.1", "localhost"], origins=loopback_origins(port))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=60) as http:
        page = http.get(url + "/").text  # the token comes the way the page gets it: written into the page
        token = re.search(r'<meta name="kvedit-token" content="([^"]+)"', page)[1]
        yield Server(url, session, token, http)
    srv.should_exit = True
    thread.join(30)
    sock.close()
    session.close()


@pytest.fixture
def applied(server: Server) -> Iterator[int]:
    """One applied edit (reverted afterwards if still applied); its id."""
    job = server.send("POST", "/api/edits", json=EDIT).json()
    done = server.wait_job(job["id"])
    assert done["state"] == "done", done
    yield done["result"]["id"]
    entry = server.session.edits.get(done["result"]["id"])
    if entry.state == "applied":
        server.session.edits.revert(server.session.lm, entry.id, cascade=True)


def patch_bytes(server: Server, edit_id: int) -> bytes:
    return server.http.get(f"{server.url}/api/edits/{edit_id}/patch").content


# every endpoint that changes the model, starts work on it, or holds it: method, path, request keywords
ENDPOINTS = {
    "prompt": ("POST", "/api/prompt", {"json": {"prompt": PROMPT}}),
    "memory": ("POST", "/api/memory", {"json": {"layer": 1, "key": 3, "prompt": PROMPT}}),
    "intervene": ("POST", "/api/intervene", {"json": {"prompt": PROMPT, "interventions": [{"layer": 1, "key": 3}]}}),
    "mine": ("POST", "/api/mine", {"json": {"layer": 1, "tokens": 100}}),
    "neurons": ("POST", "/api/neurons", {"json": {"prompts": [PROMPT], "answer": "paris", "steps": 2}}),
    "edit": ("POST", "/api/edits", {"json": EDIT}),
    "revert": ("POST", "/api/edits/{edit}/revert", {"json": {}}),
    "patch": ("POST", "/api/patches", {"content": "{patch}", "headers": {"Content-Type": "text/plain"}}),
    "cancel": ("DELETE", "/api/jobs/{job}", {}),
    "cancel-post": ("POST", "/api/jobs/{job}/cancel", {}),
}
REFUSALS = {
    "foreign origin": dict(origin="http://evil.example"),
    "foreign port": dict(origin="http://127.0.0.1:1"),
    "null origin": dict(origin="null"),
    "missing origin": dict(origin=None),
    "missing token": dict(token=None),
    "wrong token": dict(token="not-the-token"),
}


def prepared(server: Server, name: str, edit_id: int, job_id: int) -> tuple[str, str, dict]:
    method, path, kw = ENDPOINTS[name]
    kw = dict(kw)
    if kw.get("content") == "{patch}":  # a patch that applies: the edit's own, on the weights before it
        kw["content"] = patch_bytes(server, edit_id)
        server.session.edits.revert(server.session.lm, edit_id)
    return method, path.format(edit=edit_id, job=job_id), kw


@pytest.mark.parametrize("refusal", list(REFUSALS))
@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_requests_not_from_the_page_are_refused_and_change_nothing(server, applied, name, refusal):
    session = server.session
    running = server.send("POST", "/api/edits", json=ENDLESS).json() if name.startswith("cancel") else None
    try:
        method, path, kw = prepared(server, name, applied, running["id"] if running else 0)
        before, edits, jobs = snapshot(session.lm), [e.state for e in session.edits.entries], len(session.jobs.jobs)
        r = server.send(method, path, **REFUSALS[refusal], **kw)
        assert r.status_code == 403, (r.status_code, r.text)
        assert "access-control-allow-origin" not in r.headers  # and nothing lets another site read an answer
        assert "Origin" in r.json()["error"] or "refused" in r.json()["error"] or "X-Kvedit-Token" in r.json()["error"]
        if running:
            assert server.http.get(f"{server.url}/api/jobs/{running['id']}").json()["state"] == "running"
        else:
            assert same(snapshot(session.lm), before)
            assert [e.state for e in session.edits.entries] == edits and len(session.jobs.jobs) == jobs
    finally:
        if running:
            session.jobs.cancel(running["id"])
            session.jobs.wait(running["id"])


@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_the_pages_own_requests_work(server, applied, name):
    session = server.session
    running = server.send("POST", "/api/edits", json=ENDLESS).json() if name.startswith("cancel") else None
    method, path, kw = prepared(server, name, applied, running["id"] if running else 0)
    if running:
        while server.http.get(f"{server.url}/api/jobs/{running['id']}").json()["state"] != "running":
            time.sleep(0.02)
    r = server.send(method, path, **kw)
    assert r.status_code in (200, 202), (r.status_code, r.text)
    if r.status_code == 202:
        assert server.wait_job(r.json()["id"])["state"] == "done"
    if running:
        assert server.wait_job(running["id"])["state"] == "cancelled"
    if name == "revert":
        assert session.edits.get(applied).state == "reverted"
    if name == "patch":
        assert session.edits.entries[-1].source.startswith("loaded from")
        session.edits.revert(session.lm, session.edits.entries[-1].id)


def test_the_page_is_served_with_a_fresh_token_and_no_cors(server):
    page = server.http.get(server.url + "/", headers={"Origin": "http://evil.example"})
    assert server.token in page.text and len(server.token) >= 32
    assert "access-control-allow-origin" not in page.headers and page.headers["cache-control"] == "no-store"
    other = create_app(server.session)
    assert other.state.token != server.token  # a new token for every server


def test_cancel_stops_an_edit_between_steps_and_restores_the_weights(server):
    session = server.session
    original, entries = snapshot(session.lm), len(session.edits.entries)
    job = server.send("POST", "/api/edits", json=ENDLESS).json()
    deadline = time.monotonic() + 60
    while True:  # progress is reported as optimiser steps out of the step limit
        polled = server.http.get(f"{server.url}/api/jobs/{job['id']}").json()
        if polled["progress"] and polled["progress"]["unit"] == "step" and polled["progress"]["done"] >= 3:
            break
        assert time.monotonic() < deadline, polled
        time.sleep(0.02)
    assert polled["progress"]["total"] == 100_000 and 0 < polled["progress"]["fraction"] < 1
    # meanwhile every other request is told at once what holds the model
    start = time.monotonic()
    r = server.send("POST", "/api/prompt", json={"prompt": PROMPT})
    assert r.status_code == 409 and f"busy with job {job['id']}" in r.json()["error"]
    assert time.monotonic() - start < 1.0
    r = server.send("DELETE", f"/api/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    done = server.wait_job(job["id"], timeout=30)
    assert done["state"] == "cancelled" and "as it was" in done["phase"]
    assert same(snapshot(session.lm), original)  # never a half-edited model
    assert len(session.edits.entries) == entries
    r = server.send("DELETE", f"/api/jobs/{job['id']}")
    assert r.status_code == 409 and "already ended" in r.json()["error"]
    assert server.send("POST", "/api/prompt", json={"prompt": PROMPT}).status_code == 200


def test_a_view_holding_the_model_gets_a_busy_answer_not_a_wait(server):
    session = server.session
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with session.jobs.quick_use("a prompt view of 'a very long text'"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        held.wait(10)
        for method, path, body in [
            ("POST", "/api/prompt", {"prompt": PROMPT}),
            ("POST", "/api/edits", EDIT),
            ("POST", "/api/mine", {"layer": 1}),
        ]:
            start = time.monotonic()
            r = server.send(method, path, json=body)
            assert r.status_code == 409 and "a prompt view of 'a very long text'" in r.json()["error"], r.text
            assert time.monotonic() - start < 3.0
    finally:
        release.set()
        thread.join()


def test_ctrl_c_while_a_job_runs_cancels_it_and_exits_cleanly(tiny_folder, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # KVEDIT_CACHE: conftest's
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kvedit.cli import main; sys.exit(main())",
            "explore",
            "--model",
            str(tiny_folder),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            url = found[1] if found else None
        assert url, "the server did not start"
        with httpx.Client(timeout=30) as http:
            token = re.search(r'content="([^"]+)"', http.get(url + "/").text.split('name="kvedit-token"')[1])[1]
            headers = {"Origin": url, "X-Kvedit-Token": token}
            body = EDIT | {"lr": 1e-12, "max_steps": 1000, "layers": [1]}
            job = http.post(url + "/api/edits", json=body, headers=headers).json()
            while http.get(f"{url}/api/jobs/{job['id']}").json()["state"] == "queued":
                time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "terminate called" not in err and "Traceback" not in err, err
    assert re.search(r"job \d+ \(.*\) cancelled", out), out
