"""``ddpo serve-reward NAME``: any registered reward over HTTP, for the ``remote`` reward (:mod:`rewards.remote`).

An ASGI app (Starlette) served by uvicorn. Request bodies are read asynchronously, so a client that uploads slowly
holds no model time; complete batches are scored one at a time by a single scoring thread, in the order they
arrived (a FIFO queue): no client can starve the others, and the reward model is never called from two threads.

Routes: ``POST /score`` (safetensors body, see :mod:`rewards.remote`; JSON scores back), ``GET /health``.
With a token (the environment variable ``DDPO_REWARD_TOKEN`` by default), ``/score`` needs
``Authorization: Bearer TOKEN``; bound to an address other machines can reach, the server refuses to start without one.

A request is bounded before it is read: a body longer than ``--max-batch`` float32 images of ``--max-image-size``
pixels (plus the header) is refused from its ``Content-Length``, or, sent in chunks, as soon as it grows past that;
the batch's shape is checked from the safetensors header before any tensor is decoded, and its pixels (finite, in
``[0, 1]``) before the reward sees them. Every refusal is a 4xx with a one-line reason; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rewards import Reward, check_reward_output, get_reward
from rewards.remote import TOKEN_ENV, BatchTooLarge, decode_batch, max_body_bytes

from ..training import trust

__all__ = ["build_app", "check_settings", "is_loopback", "serve"]


class Scorer:
    """The reward and its one scoring thread; counts what it served."""

    def __init__(self, reward: Reward, device: str | None = None, max_batch: int = 256):
        self.reward, self.device, self.max_batch = reward, device, max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.lock = threading.Lock()
        self.queued = 0
        self.batches = 0
        self.images = 0
        self.seconds = 0.0

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        start = time.perf_counter()
        if self.device is not None:
            images = images.to(self.device)
        with torch.no_grad():
            values = check_reward_output(self.reward(images, prompts), len(prompts), self.reward.name)
        info = {k: float(v) for k, v in self.reward.last_info().items()}
        with self.lock:
            self.batches += 1
            self.images += len(prompts)
            self.seconds += time.perf_counter() - start
        return {"scores": values.detach().double().cpu().tolist(), "info": info, "reward": self.reward.name}


MAX_IMAGE_SIZE = 1024
"""Default ``--max-image-size``: the largest image side (pixels) a request may hold (FLUX/SDXL at 1024 px)."""


class BodyTooLarge(Exception):
    """The request body grew past the server's bound while it was read."""


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (:class:`BodyTooLarge`) past ``limit`` bytes: from ``Content-Length`` before a byte
    is read, or, for a body sent in chunks, as soon as what arrived exceeds it."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge(f"Content-Length {declared}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    reward: Reward,
    token: str | None = None,
    device: str | None = None,
    max_batch: int = 256,
    max_image_size: int = MAX_IMAGE_SIZE,
):
    """The Starlette app serving ``reward`` (already built)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if reward.state_dict():
        raise ValueError(
            f"reward {reward.name!r} has state (an online reward such as the discriminator learns from each epoch's "
            "samples and is checkpointed with the run): serve only stateless rewards; train online ones in the run"
        )
    scorer = Scorer(reward, device, max_batch)
    limit = max_body_bytes(max_batch, max_image_size)

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def refuse(status: int, reason: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(reason.split())}, status_code=status)  # one line

    async def health(request: Request) -> JSONResponse:
        answer = {
            "status": "ok",
            "reward": reward.name,
            "queued": scorer.queued,
            "batches": scorer.batches,
            "images": scorer.images,
            "token_required": bool(token),
            "max_batch": max_batch,
            "max_image_size": max_image_size,
            "max_body_bytes": limit,
        }
        if token and "authorization" in request.headers:
            answer["token_ok"] = authorized(request)
        return JSONResponse(answer)

    async def score(request: Request) -> JSONResponse:
        if token and not authorized(request):
            return refuse(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        try:
            body = await read_body(request, limit)  # without blocking the loop: a slow upload holds no model time
        except BodyTooLarge as err:
            return refuse(
                413,
                f"request body too large ({err}): this server takes at most {limit} bytes, --max-batch {max_batch} "
                f"float32 images of --max-image-size {max_image_size} px; send smaller batches",
            )
        try:
            images, prompts = decode_batch(body, max_batch, max_image_size)
        except BatchTooLarge as err:
            return refuse(413, str(err))
        except ValueError as err:
            return refuse(400, f"bad request: {err}")
        scorer.queued += 1
        try:
            # The one scoring thread takes batches in arrival order.
            answer = await asyncio.get_running_loop().run_in_executor(scorer.executor, scorer.score, images, prompts)
        except Exception as err:  # the reward failed on this batch: tell the client, keep serving
            return refuse(500, f"reward {reward.name!r} failed: {type(err).__name__}: {err}")
        finally:
            scorer.queued -= 1
        return JSONResponse(answer)

    app = Starlette(routes=[Route("/health", health), Route("/score", score, methods=["POST"])])
    app.state.scorer = scorer
    return app


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (127.0.0.0/8, ::1): only this machine can
    connect. ``0.0.0.0``, ``::`` and other machines' names are not."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)


def check_settings(
    host: str, port: int, max_batch: int, max_image_size: int, token: str | None, token_env: str = TOKEN_ENV
) -> None:
    """Raise ValueError, before anything is loaded or bound, for settings the server cannot or must not run with."""
    if not 0 <= port <= 65535:
        raise ValueError(f"serve-reward --port must be 0-65535 (0: a free one); got {port}")
    if max_batch < 1:
        raise ValueError(
            f"serve-reward --max-batch must be >= 1 (the largest batch a request may hold); got {max_batch}"
        )
    if max_image_size < 1:
        raise ValueError(f"serve-reward --max-image-size must be >= 1 (pixels per side); got {max_image_size}")
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(
            f"serve-reward --host {host}: no such address ({err}); give one such as 127.0.0.1 (this machine only) "
            "or 0.0.0.0 (all interfaces)"
        ) from None
    if not token and not is_loopback(host):
        raise ValueError(
            f"serve-reward --host {host} can be reached from other machines and no token is set: set one in "
            f"{token_env} (e.g. export {token_env}=$(openssl rand -hex 16)) and the same on the clients, or serve "
            "on --host 127.0.0.1"
        )


def serve(
    name: str,
    options: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str | None = None,
    max_batch: int = 256,
    max_image_size: int = MAX_IMAGE_SIZE,
    token_env: str = TOKEN_ENV,
) -> int:
    """Build the reward ``name`` with ``options``, bind ``host:port`` (port 0: a free one) and serve until stopped.
    Prints the URL once listening (the first line of output). Returns 0, or 130 when stopped by Ctrl-C (one line on
    stderr, no traceback)."""
    import uvicorn

    check_settings(host, port, max_batch, max_image_size, token, token_env)
    trust.require(name, options)  # before the reward's module is imported
    scorer = None
    try:
        reward = get_reward(name, **(options or {}))
        app = build_app(reward, token=token, device=device, max_batch=max_batch, max_image_size=max_image_size)
        scorer = app.state.scorer
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"ddpo serve-reward: {reward.name} on http://{shown}:{bound} (POST /score, GET /health"
            f"{'; token required' if token else ''})",
            flush=True,
        )
        if not token:
            print(
                f"ddpo serve-reward: no token ({token_env} unset): any process on this machine can use the server",
                file=sys.stderr,
                flush=True,
            )
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        try:
            server.run(sockets=[sock])  # on Ctrl-C uvicorn shuts down, then raises KeyboardInterrupt
        finally:
            sock.close()
    except KeyboardInterrupt:
        served = f"; served {scorer.batches} batches ({scorer.images} images)" if scorer is not None else ""
        print(f"ddpo serve-reward: interrupted (Ctrl-C){served}", file=sys.stderr, flush=True)
        return 130
    sys.stdout.flush()
    return 0
