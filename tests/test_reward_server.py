"""The reward server (`ddpo serve-reward`) and the `remote` reward, over real HTTP on 127.0.0.1: scores equal the
in-process reward's, tokens, malformed answers, a server that is down, a slow client that cannot starve the others,
and a training run whose server is killed mid-run (the run stops with an error naming the URL, its last checkpoint
intact, and resumes against a new server)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

import rewards
from ddpo.cli import main
from ddpo.tools.reward_server import build_app
from ddpo.training import checkpoint
from ddpo.training.runlog import read_jsonl
from rewards import RewardError, get_reward
from rewards.remote import decode_batch, encode_batch

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def thread_server(reward, token: str | None = None):
    """The real app under uvicorn in a thread, on a free 127.0.0.1 port; stopped on exit."""
    import uvicorn

    app = build_app(reward, token=token)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def process_server(name: str, pythonpath: list[str], *extra: str):
    """`ddpo serve-reward NAME --port 0` as a process; yields (process, url) once /health answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("DDPO_REWARD_TOKEN", None)
    cmd = [sys.executable, "-m", "ddpo.cli", "serve-reward", name, "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "http://" not in line:
            assert time.monotonic() < deadline, "the server printed no URL"
            assert proc.poll() is None, f"the server exited: {proc.stdout.read()}"
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", timeout=5).ok:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, "the server never became healthy"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        proc.stdout.close()


def images_and_prompts(n: int = 5, size: int = 16):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, [f"prompt {i}" for i in range(n)]


def test_wire_format_round_trip():
    images, prompts = images_and_prompts()
    back, back_prompts = decode_batch(encode_batch(images, prompts))
    assert torch.equal(back, images) and back_prompts == prompts
    back8, _ = decode_batch(encode_batch(images, prompts, dtype="uint8"))
    assert (back8 - images).abs().max() <= 0.5 / 255 + 1e-7
    with pytest.raises(ValueError, match="not a safetensors payload"):
        decode_batch(b"hello")


def test_remote_scores_equal_the_in_process_reward():
    spec = {"components": {"brightness": 1.0, "contrast": {"weight": 2.0}}}
    local = get_reward("weighted", **spec)
    images, prompts = images_and_prompts()
    expected = local(images, prompts)
    with thread_server(get_reward("weighted", **spec)) as url:
        remote = get_reward("remote", url=url)
        assert remote.served == "weighted"
        assert torch.equal(remote(images, prompts), expected)  # float32 on the wire: exact
        assert remote.last_info() == pytest.approx(local.last_info())  # the components' means come back too
        rounded = (images * 255).round() / 255
        as_uint8 = get_reward("remote", url=url, dtype="uint8")(images, prompts)
        torch.testing.assert_close(as_uint8, local(rounded, prompts), rtol=0, atol=1e-6)
        health = requests.get(url + "/health", timeout=10).json()
        assert health["batches"] == 2 and health["images"] == 10
        # A bad body is refused with the reason; the server keeps serving.
        answer = requests.post(url + "/score", data=b"not safetensors", timeout=10)
        assert answer.status_code == 400 and "not a safetensors payload" in answer.json()["error"]
        assert torch.equal(remote(images, prompts), expected)


def test_token_is_required_when_configured():
    images, prompts = images_and_prompts(2)
    with thread_server(get_reward("brightness"), token="s3cret") as url:
        with pytest.raises(RewardError, match=r"refused the request: 401.*DDPO_REWARD_TOKEN"):
            get_reward("remote", url=url, token="wrong")(images, prompts)
        values = get_reward("remote", url=url, token="s3cret")(images, prompts)
        assert torch.equal(values, get_reward("brightness")(images, prompts))


def test_a_server_that_is_down_is_named_after_the_retries():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RewardError, match=rf"remote reward at {url}/health: cannot connect.*after 3 attempts"):
        get_reward("remote", url=url, retries=2, backoff=0.01)


@pytest.mark.parametrize(
    "answer, message",
    [
        (b"<html>oops</html>", "\\(not JSON\\)"),
        (json.dumps({"scores": [1.0]}).encode(), "expected 2 scores, got 1 scores"),
        (json.dumps({"scores": ["a", "b"]}).encode(), "scores must be numbers"),
    ],
)
def test_malformed_answers_are_named(answer, message):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # /health
            self._send(json.dumps({"status": "ok", "reward": "odd"}).encode())

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(answer)

        def _send(self, body: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RewardError, match=rf"remote reward at {url}/score answered malformed data.*{message}"):
            get_reward("remote", url=url, retries=0)(*images_and_prompts(2))
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_a_slow_client_does_not_starve_the_others():
    images, prompts = images_and_prompts(3)
    with thread_server(get_reward("brightness")) as url:
        port = int(url.rsplit(":", 1)[1])
        body = encode_batch(images, prompts)
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            slow.sendall(head + body[:100])  # ... and the rest never comes while the other client is served
            values = get_reward("remote", url=url, timeout=30, retries=0)(images, prompts)
            assert torch.equal(values, get_reward("brightness")(images, prompts))
            slow.sendall(body[100:])  # the slow client finishes and is served too
            reply = ""
            while '"scores"' not in reply:  # the head and the body may arrive in separate reads
                chunk = slow.recv(65536).decode()
                if not chunk:
                    break
                reply += chunk
            assert reply.startswith("HTTP/1.1 200") and '"scores"' in reply
        finally:
            slow.close()


def test_a_server_with_state_is_refused():
    reference = torch.rand(4, 3, 16, 16)
    with pytest.raises(ValueError, match="has state"):
        build_app(get_reward("discriminator", reference_images=reference, image_size=16))


DYING = """
import os, signal

import rewards

calls = 0


@rewards.reward_function
def luma(images, prompts):
    return (0.2126 * images[:, 0] + 0.7152 * images[:, 1] + 0.0722 * images[:, 2]).mean(dim=(1, 2))


@rewards.reward_function
def dies_on_third_call(images, prompts):
    global calls
    calls += 1
    if calls == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-request, as by the OOM killer or a preemption
    return luma(images, prompts)
"""


def test_training_against_a_server_killed_mid_run_stops_cleanly_and_resumes(fast_overrides, tmp_path, capsys):
    (tmp_path / "served_rewards.py").write_text(DYING)
    run = tmp_path / "runs" / "run"
    with process_server("served_rewards:dies_on_third_call", [str(tmp_path)]) as (proc, url):
        options = json.dumps({"url": url, "retries": 2, "backoff": 0.05, "timeout": 30})
        args = ["train", "--preset", "tiny", "num_epochs=3", "reward.name=remote", f"reward.options={options}"]
        # Epoch 0 scores 2 batches; the first batch of epoch 1 kills the server.
        assert main([*args, *fast_overrides]) == 2  # one clear line, no traceback (the trainer's reward errors)
        err = capsys.readouterr().err
        assert re.search(rf"remote reward at {re.escape(url)}/score: .*gave up after 3 attempts", err)
        assert "Traceback" not in err
        assert proc.wait(timeout=30) != 0
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["checkpoint_000001"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert checkpoint.load(checkpoint.latest(run / "checkpoints"), 0)["state"]["epoch"] == 1
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [0]
    # A new server (same reward, new address): the run resumes from its checkpoint and finishes.
    with process_server("served_rewards:luma", [str(tmp_path)]) as (_, new_url):
        assert main(["train", "--resume", str(run), f"reward.options.url={new_url}"]) == 0
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]
    assert "remote" in rewards.available()
