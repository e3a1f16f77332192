"""``remote``: a reward scored by a server over HTTP (``ddpo serve-reward NAME`` runs one), and the wire format both
sides use.

A large reward model can live on other GPUs or another machine: the trainer sends each batch of images and prompts,
the server scores it with any registered reward and answers the scores. Wire format (no pickle anywhere):

* ``POST {url}/score``: body = the safetensors serialisation of ``{"images": [B, 3, H, W]}`` (``float32``, or
  ``float16``/``uint8`` to send less), with the prompts as JSON in its metadata (``{"prompts": "[...]"}``);
  header ``Authorization: Bearer TOKEN`` when the server has a token.
* answer: JSON ``{"scores": [B floats], "info": {name: float}, "reward": name}``; an error: JSON ``{"error": text}``
  with a 4xx/5xx status.
* ``GET {url}/health``: JSON ``{"status": "ok", "reward": name, ...}``.

The client retries what can pass (connection refused or reset, timeouts, 5xx answers) ``retries`` times with
exponential back-off, and then stops the run with an error naming the URL; a malformed answer or a refused request
(4xx) stops it at once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from .base import Reward, RewardError, check_images, register

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
TOKEN_ENV = "DDPO_REWARD_TOKEN"
"""Environment variable holding the shared token (client and server), kept out of config files and process lists."""


def encode_batch(images: torch.Tensor, prompts: list[str], dtype: str = "float32") -> bytes:
    """``images`` ``[B, 3, H, W]`` in ``[0, 1]`` and ``prompts`` -> the request body (safetensors bytes)."""
    from safetensors.torch import save

    if dtype not in WIRE_DTYPES:
        raise ValueError(f"remote reward: dtype must be one of {', '.join(WIRE_DTYPES)}; got {dtype!r}")
    images = images.detach().float().cpu()
    if dtype == "uint8":
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        images = images.to(WIRE_DTYPES[dtype])
    return save({"images": images.contiguous()}, metadata={"prompts": json.dumps(list(prompts))})


def decode_batch(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """The request body -> ``(images float32 [B, 3, H, W] in [0, 1], prompts)``; ValueError naming what is wrong."""
    from safetensors.torch import load

    try:
        tensors = load(body)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"the body is not a safetensors payload ({type(err).__name__}: {err})") from None
    if set(tensors) != {"images"}:
        raise ValueError(f"the payload must hold exactly one tensor named 'images'; got {sorted(tensors)}")
    images = tensors["images"]
    # The metadata (prompts) is in the JSON header: 8 bytes of little-endian length, then the header.
    length = int.from_bytes(body[:8], "little")
    metadata = json.loads(body[8 : 8 + length]).get("__metadata__") or {}
    try:
        prompts = json.loads(metadata["prompts"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError("the payload's metadata must hold 'prompts', a JSON list of strings") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("the payload's 'prompts' must be a JSON list of strings")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif images.dtype in (torch.float16, torch.float32):
        images = images.float()
    else:
        raise ValueError(f"images must be float32, float16 or uint8; got {images.dtype}")
    check_images(images)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts


@register("remote")
class RemoteReward(Reward):
    """Scores images with a reward served over HTTP (``ddpo serve-reward``).

    Args:
        url: the server, e.g. ``http://gpu-box:8000`` (``/score`` and ``/health`` are appended).
        timeout: seconds to wait for one answer (connect and read) before the attempt counts as failed.
        retries: attempts after the first when the server cannot be reached, times out or answers 5xx.
        backoff: seconds before the first retry, doubled at each further one.
        token: the server's token; default the environment variable ``DDPO_REWARD_TOKEN`` (preferred: a config
            file is copied into the run directory).
        dtype: ``float32`` (exact), ``float16`` or ``uint8`` (4x less to send; scores of the 8-bit images).
        check: ask ``/health`` when built, so a wrong URL fails before any sampling.
    """

    name = "remote"
    io_bound = True
    """Scoring waits on the network: the trainer overlaps it with sampling even on a CPU."""

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        token: str | None = None,
        dtype: str = "float32",
        check: bool = True,
    ):
        import requests

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://; got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                f"remote reward: timeout must be > 0, retries and backoff >= 0; got {timeout}, {retries}, {backoff}"
            )
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"remote reward: dtype must be one of {', '.join(WIRE_DTYPES)}; got {dtype!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.dtype = float(timeout), int(retries), float(backoff), dtype
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.session = requests.Session()
        self._info: dict[str, float] = {}
        self.served: str | None = None
        if check:
            health = self._request("GET", "/health")
            self.served = health.get("reward") if isinstance(health, dict) else None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        """One call with retries; returns the decoded JSON answer or raises :class:`RewardError` naming the URL."""
        import requests

        url = self.url + path
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self.session.request(method, url, data=body, headers=self._headers(), timeout=self.timeout)
            except requests.Timeout:
                problem = f"no answer within timeout={self.timeout:g} s"
                continue
            except requests.ConnectionError as err:
                problem = f"cannot connect ({type(err).__name__}: {str(err)[:200]})"
                continue
            if answer.status_code >= 500:
                problem = f"server error {answer.status_code}: {answer.text[:300]}"
                continue
            if answer.status_code >= 400:
                hint = (
                    " (set the same token in DDPO_REWARD_TOKEN for client and server)"
                    if answer.status_code == 401
                    else ""
                )
                raise RewardError(
                    f"remote reward at {url} refused the request: {answer.status_code} {answer.text[:300]}{hint}"
                )
            try:
                return answer.json()
            except ValueError:
                raise RewardError(
                    f"remote reward at {url} answered malformed data (not JSON): {answer.text[:200]!r}"
                ) from None
        raise RewardError(
            f"remote reward at {url}: {problem}; gave up after {self.retries + 1} attempts "
            f"(reward.options: retries={self.retries}, backoff={self.backoff:g}, timeout={self.timeout:g}). "
            "Is `ddpo serve-reward` running there and reachable?"
        )

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        answer = self._request("POST", "/score", encode_batch(images, prompts, self.dtype))
        url = self.url + "/score"
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"{str(answer)[:200]!r}"
            raise RewardError(
                f"remote reward at {url} answered malformed data: expected {len(prompts)} scores, got {got}"
            )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
            raise RewardError(
                f"remote reward at {url} answered malformed data: scores must be numbers; got {scores[:8]}"
            )
        info = answer.get("info") or {}
        self._info = {str(k): float(v) for k, v in info.items() if isinstance(v, (int, float))}
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def last_info(self) -> dict[str, float]:
        return dict(self._info)
