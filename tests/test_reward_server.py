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
import signal
import socket
import struct
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


class _PlainHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in HTTP server's handler: answers 200 with a body, logs nothing."""

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def thread_server(reward, token: str | None = None, **limits):
    """The real app under uvicorn in a thread, on a free 127.0.0.1 port; stopped on exit."""
    import uvicorn

    app = build_app(reward, token=token, **limits)
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
    """`ddpo serve-reward NAME --port 0 --trust-import-path` as a process; yields (process, url) once /health
    answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("DDPO_REWARD_TOKEN", None)
    cmd = [sys.executable, "-m", "ddpo.cli", "serve-reward", name, "--port", "0", "--trust-import-path", *extra]
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


def test_token_is_required_when_configured(monkeypatch):
    images, prompts = images_and_prompts(2)
    monkeypatch.delenv("DDPO_REWARD_TOKEN", raising=False)
    with thread_server(get_reward("brightness"), token="s3cret") as url:
        # Found when the reward is built (from /health), before anything is sampled: a missing and a wrong token.
        with pytest.raises(RewardError, match=r"/health requires a token and none is set: set DDPO_REWARD_TOKEN"):
            get_reward("remote", url=url)
        with pytest.raises(RewardError, match=r"/health refused the token: set DDPO_REWARD_TOKEN"):
            get_reward("remote", url=url, token="wrong")
        # Without that check, /score itself refuses with the same advice.
        for token, given in ((None, "none is set"), ("wrong", "the one set is not the server's")):
            with pytest.raises(RewardError, match=rf"refused the request: 401.*needs a token and {given}: set DDPO_"):
                get_reward("remote", url=url, token=token, check=False)(images, prompts)
        values = get_reward("remote", url=url, token="s3cret")(images, prompts)
        assert torch.equal(values, get_reward("brightness")(images, prompts))
        monkeypatch.setenv("DDPO_REWARD_TOKEN", "s3cret")  # the preferred way: the environment, not the config
        assert torch.equal(get_reward("remote", url=url)(images, prompts), values)


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
    class Handler(_PlainHandler):
        def do_GET(self):  # /health
            self._send(json.dumps({"status": "ok", "reward": "odd"}).encode())

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(answer)

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


# a hostile or broken client gets a 4xx with a one-line reason, before the server reads more than
# its bound, and the server keeps serving.

LIMITS = {"max_batch": 4, "max_image_size": 16}


def safetensors_body(images: torch.Tensor, prompts=None, raw_prompts: str | None = None) -> bytes:
    from safetensors.torch import save

    prompts = [f"p{i}" for i in range(images.shape[0] if images.ndim else 0)] if prompts is None else prompts
    return save({"images": images.contiguous()}, metadata={"prompts": raw_prompts or json.dumps(prompts)})


def header_only(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


BAD_REQUESTS = [
    ("not safetensors", lambda: b"not safetensors at all", 400, "not a safetensors payload"),
    ("JSON instead of safetensors", lambda: json.dumps({"images": [[0.5]]}).encode(), 400, "not a safetensors"),
    ("header not JSON", lambda: header_only(b"{'images': oops") + b"\0" * 64, 400, "its header is not JSON"),
    ("header not an object", lambda: header_only(b"[1, 2]"), 400, "its header is not a JSON object"),
    ("header nested too deep", lambda: header_only(b"[" * 40000 + b"]" * 40000), 400, "its header is not JSON"),
    ("prompts not JSON", lambda: safetensors_body(torch.rand(2, 3, 8, 8), raw_prompts="[oops"), 400, "'prompts'"),
    ("prompts not strings", lambda: safetensors_body(torch.rand(2, 3, 8, 8), [1, 2]), 400, "list of strings"),
    ("two tensors", lambda: header_only(b'{"images": {}, "x": {}}'), 400, "exactly one tensor named 'images'"),
    ("two channels", lambda: safetensors_body(torch.rand(2, 2, 8, 8)), 400, "[B, 3, H, W]"),
    ("3-d images", lambda: safetensors_body(torch.rand(3, 8, 8), ["a", "b", "c"]), 400, "[B, 3, H, W]"),
    ("empty batch", lambda: safetensors_body(torch.rand(0, 3, 8, 8), []), 400, "[B, 3, H, W]"),
    ("int32 images", lambda: safetensors_body(torch.zeros(2, 3, 8, 8, dtype=torch.int32)), 400, "got 'I32'"),
    ("images vs prompts", lambda: safetensors_body(torch.rand(2, 3, 8, 8), ["a"] * 3), 400, "2 images but 3 prompts"),
    ("NaN pixels", lambda: safetensors_body(torch.rand(2, 3, 8, 8).index_fill(0, torch.tensor([1]), float("nan"))),
     400, "non-finite pixels (NaN or inf) at batch indices [1]"),
    ("inf pixels", lambda: safetensors_body(torch.full((1, 3, 8, 8), float("inf"))), 400, "non-finite pixels"),
    ("pixels above 1", lambda: safetensors_body(torch.full((2, 3, 8, 8), 1.5)), 400, "must be in [0, 1]; got"),
    ("pixels below 0", lambda: safetensors_body(torch.full((2, 3, 8, 8), -0.25)), 400, "must be in [0, 1]"),
    ("too many images", lambda: safetensors_body(torch.rand(5, 3, 8, 8)), 413, "5 images exceed the server's --max-b"),
    ("images too large", lambda: safetensors_body(torch.rand(1, 3, 8, 32)), 413, "8x32 px exceed the server's --max-i"),
]  # fmt: skip


@pytest.fixture(scope="module")
def limited_server():
    with thread_server(get_reward("brightness"), **LIMITS) as url:
        yield url


def assert_still_serving(url: str) -> None:
    images, prompts = images_and_prompts(2, size=8)
    values = get_reward("remote", url=url, retries=0)(images, prompts)
    assert torch.equal(values, get_reward("brightness")(images, prompts))


@pytest.mark.parametrize(("build", "status", "phrase"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_keeps_serving(limited_server, build, status, phrase):
    answer = requests.post(limited_server + "/score", data=build(), timeout=30)
    error = answer.json()["error"]
    assert answer.status_code == status and phrase in error, (answer.status_code, error)
    assert "\n" not in error
    assert_still_serving(limited_server)


def raw_exchange(url: str, head: str, parts: list[bytes]) -> str:
    """Send ``head`` and then ``parts`` over a raw socket (stopping if the server hangs up) and return what the
    server answers; the body is never completed, so an answer proves the server did not wait for it."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(head.encode())
            for part in parts:
                sock.sendall(part)
        reply = b""
        with contextlib.suppress(OSError):
            while b'"}' not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    return reply.decode(errors="replace")


def test_the_body_is_bounded_before_it_is_read(limited_server):
    from rewards.remote import max_body_bytes

    limit = max_body_bytes(**LIMITS)
    assert requests.get(limited_server + "/health", timeout=10).json()["max_body_bytes"] == limit
    # A declared length over the bound: refused from the header, none of the body sent.
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n"
    reply = raw_exchange(limited_server, head, [])
    assert reply.startswith("HTTP/1.1 413") and "request body too large (Content-Length 1000000000000)" in reply
    # A chunked body (no length): refused as soon as it passes the bound, its end never sent.
    chunk = b"x" * 65536
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (limit // len(chunk) + 1)
    reply = raw_exchange(limited_server, "POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", parts)
    assert reply.startswith("HTTP/1.1 413") and f"more than {limit} bytes" in reply
    assert_still_serving(limited_server)


def test_the_client_checks_the_servers_limits_before_sending(limited_server):
    remote = get_reward("remote", url=limited_server)
    with pytest.raises(RewardError, match=r"/score: 5 images exceed the server's --max-batch 4"):
        remote(*images_and_prompts(5, size=8))
    with pytest.raises(RewardError, match=r"images of 32x32 px exceed the server's --max-image-size 16"):
        remote(*images_and_prompts(1, size=32))


def test_the_client_retries_a_connection_broken_mid_answer():
    """The first /score answer is cut after a few bytes of its body (the connection reset); the retry succeeds."""
    images, prompts = images_and_prompts(2)
    expected = get_reward("brightness")(images, prompts)
    posts = []

    class Handler(_PlainHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # /health
            self._send(json.dumps({"status": "ok", "reward": "brightness"}).encode())

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(1)
            body = json.dumps({"scores": expected.tolist(), "info": {}}).encode()
            if len(posts) == 1:  # headers and part of the body, then a reset (SO_LINGER 0)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:5])
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            self._send(body)

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # the reset connection's flush fails: expected
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        values = get_reward("remote", url=url, retries=1, backoff=0.01)(images, prompts)
        assert torch.equal(values, expected) and len(posts) == 2
        posts.clear()
        with pytest.raises(RewardError, match=r"/score: the connection broke during the answer.*after 1 attempts"):
            get_reward("remote", url=url, retries=0)(images, prompts)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_loopback_is_told_apart_from_reachable_addresses():
    from ddpo.tools.reward_server import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.0.2.7", "no-such-host.invalid"))


def test_ctrl_c_stops_the_server_with_one_line(tmp_path):
    """SIGINT (Ctrl-C): uvicorn shuts down and re-raises it; the command prints one line, no traceback, exit 130.
    Without a token on loopback it said so at start (one line on stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("DDPO_REWARD_TOKEN", None)
    cmd = [sys.executable, "-m", "ddpo.cli", "serve-reward", "brightness", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "the server printed no URL"
        url = proc.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        deadline = time.monotonic() + 60
        while True:  # the URL is printed once bound; uvicorn listens a moment later
            with contextlib.suppress(requests.ConnectionError):
                assert requests.get(url + "/health", timeout=10).json()["token_required"] is False
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the server never became healthy"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.splitlines() == [
        "ddpo serve-reward: no token (DDPO_REWARD_TOKEN unset): any process on this machine can use the server",
        "ddpo serve-reward: interrupted (Ctrl-C); served 0 batches (0 images)",
    ]
