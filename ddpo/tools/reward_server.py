"""``ddpo serve-reward NAME``: any registered reward over HTTP, for the ``remote`` reward (:mod:`rewards.remote`).

An ASGI app (Starlette) served by uvicorn. Request bodies are read asynchronously, so a client that uploads slowly
holds no model time; complete batches are scored one at a time by a single scoring thread, in the order they
arrived (a FIFO queue): no client can starve the others, and the reward model is never called from two threads.

Routes: ``POST /score`` (safetensors body, see :mod:`rewards.remote`; JSON scores back), ``GET /health``.
With a token (the environment variable ``DDPO_REWARD_TOKEN`` by default), ``/score`` needs
``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rewards import Reward, check_reward_output, get_reward
from rewards.remote import decode_batch

__all__ = ["build_app", "serve"]


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


def build_app(reward: Reward, token: str | None = None, device: str | None = None, max_batch: int = 256):
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

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "reward": reward.name,
                "queued": scorer.queued,
                "batches": scorer.batches,
                "images": scorer.images,
                "token_required": bool(token),
            }
        )

    async def score(request: Request) -> JSONResponse:
        if token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "missing or wrong token (Authorization: Bearer TOKEN)"}, status_code=401)
        body = await request.body()  # read without blocking the loop: a slow upload holds no model time
        try:
            images, prompts = decode_batch(body)
        except ValueError as err:
            return JSONResponse({"error": f"bad request: {err}"}, status_code=400)
        if len(prompts) > max_batch:
            return JSONResponse(
                {"error": f"{len(prompts)} images exceed the server's --max-batch {max_batch}; send smaller batches"},
                status_code=413,
            )
        scorer.queued += 1
        try:
            # The one scoring thread takes batches in arrival order.
            answer = await asyncio.get_running_loop().run_in_executor(scorer.executor, scorer.score, images, prompts)
        except Exception as err:  # the reward failed on this batch: tell the client, keep serving
            return JSONResponse(
                {"error": f"reward {reward.name!r} failed: {type(err).__name__}: {err}"}, status_code=500
            )
        finally:
            scorer.queued -= 1
        return JSONResponse(answer)

    app = Starlette(routes=[Route("/health", health), Route("/score", score, methods=["POST"])])
    app.state.scorer = scorer
    return app


def serve(
    name: str,
    options: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str | None = None,
    max_batch: int = 256,
) -> None:
    """Build the reward ``name`` with ``options``, bind ``host:port`` (port 0: a free one) and serve until stopped.
    Prints the URL once listening (the first line of output)."""
    import uvicorn

    reward = get_reward(name, **(options or {}))
    app = build_app(reward, token=token, device=device, max_batch=max_batch)
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
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
