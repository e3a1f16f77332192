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

The server checks the safetensors header before it decodes anything (one tensor ``images`` ``[B, 3, H, W]`` of a wire
dtype, ``B <= max_batch``, ``H, W <= max_image_size``), then the pixels (finite, in ``[0, 1]``); a request it refuses
gets a 4xx with a one-line reason. ``/health`` tells the client the server's limits and whether it needs a token.

The client retries what can pass (connection refused, or reset before or in the middle of an answer, timeouts, 5xx
answers) ``retries`` times with exponential back-off, and then stops the run with an error naming the URL; a
malformed answer or a refused request (4xx) stops it at once, as does a batch over the server's limits or a missing
or wrong token (both found from ``/health`` before anything is sent).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from .base import Reward, RewardError, check_images, register

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
_HEADER_DTYPES = {"F32": "float32", "F16": "float16", "U8": "uint8"}
"""The safetensors dtype names of :data:`WIRE_DTYPES`."""
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


class BatchTooLarge(ValueError):
    """A batch over the server's ``--max-batch`` or ``--max-image-size`` (answered 413)."""


def max_body_bytes(max_batch: int, max_image_size: int) -> int:
    """The largest request body a server with these limits reads: ``max_batch`` float32 images of
    ``max_image_size`` px squared, plus the safetensors header with the prompts (up to 64 KiB + 4 KiB an image)."""
    return max_batch * 3 * max_image_size * max_image_size * 4 + 65536 + 4096 * max_batch


def read_header(body: bytes) -> tuple[list[int], str, list[str]]:
    """The safetensors header of a request body, checked before any tensor is decoded: ``(shape, wire dtype,
    prompts)``; ValueError naming what is wrong."""
    if len(body) < 8:
        raise ValueError(f"the body is not a safetensors payload ({len(body)} bytes)")
    length = int.from_bytes(body[:8], "little")
    if length > len(body) - 8:
        raise ValueError(
            f"the body is not a safetensors payload (its header length {length} exceeds the {len(body)} bytes sent)"
        )
    try:
        header = json.loads(body[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise ValueError(f"the body is not a safetensors payload (its header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError("the body is not a safetensors payload (its header is not a JSON object)")
    names = sorted(key for key in header if key != "__metadata__")
    if names != ["images"] or not isinstance(header["images"], dict):
        raise ValueError(f"the payload must hold exactly one tensor named 'images'; got {names}")
    shape, dtype = header["images"].get("shape"), header["images"].get("dtype")
    if dtype not in _HEADER_DTYPES:
        raise ValueError(f"images must be float32, float16 or uint8; got {dtype!r}")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == 3) or not all(
        isinstance(n, int) and n >= 1 for n in shape
    ):
        raise ValueError(f"images must be a float tensor [B, 3, H, W] in [0, 1]; got shape {shape}")
    metadata = header.get("__metadata__") or {}
    try:
        prompts = json.loads(metadata["prompts"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError("the payload's metadata must hold 'prompts', a JSON list of strings") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("the payload's 'prompts' must be a JSON list of strings")
    return shape, _HEADER_DTYPES[dtype], prompts


def check_limits(shape: list[int], max_batch: int | None, max_image_size: int | None) -> None:
    """Raise :class:`BatchTooLarge` for a batch ``[B, 3, H, W]`` over a server's limits."""
    if max_batch is not None and shape[0] > max_batch:
        raise BatchTooLarge(f"{shape[0]} images exceed the server's --max-batch {max_batch}; send smaller batches")
    if max_image_size is not None and max(shape[2:]) > max_image_size:
        raise BatchTooLarge(
            f"images of {shape[2]}x{shape[3]} px exceed the server's --max-image-size {max_image_size}; "
            "start the server with a larger --max-image-size"
        )


def check_pixels(images: torch.Tensor) -> None:
    """Raise ValueError unless every pixel of float ``images`` is finite and in ``[0, 1]`` (a reward scores images,
    not NaNs: its score of one would be meaningless)."""
    finite = torch.isfinite(images)
    if not finite.all():
        bad = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"images hold non-finite pixels (NaN or inf) at batch indices {bad[:8]}; send images in [0, 1]"
        )
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"pixel values must be in [0, 1]; got values from {low:g} to {high:g}")


def decode_batch(
    body: bytes, max_batch: int | None = None, max_image_size: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """The request body -> ``(images float32 [B, 3, H, W] in [0, 1], prompts)``; ValueError naming what is wrong
    (:class:`BatchTooLarge` past ``max_batch`` images or ``max_image_size`` px, found from the header alone)."""
    from safetensors.torch import load

    shape, _, prompts = read_header(body)
    check_limits(shape, max_batch, max_image_size)
    if len(prompts) != shape[0]:
        raise ValueError(f"{shape[0]} images but {len(prompts)} prompts")
    try:
        tensors = load(body)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"the body is not a safetensors payload ({type(err).__name__}: {err})") from None
    images = tensors["images"]
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    check_images(images)
    check_pixels(images)
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

    #: The pixels are serialised and sent over HTTP: no gradient comes back, whatever the served reward is.
    differentiable = False

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
        self.limits: dict[str, int] = {}
        """The server's ``max_batch`` / ``max_image_size`` from ``/health`` (checked before a batch is sent)."""
        if check:
            health = self._request("GET", "/health")
            health = health if isinstance(health, dict) else {}
            self.served = health.get("reward")
            self.limits = {k: health[k] for k in ("max_batch", "max_image_size") if isinstance(health.get(k), int)}
            self._check_token(health)

    def _check_token(self, health: dict[str, Any]) -> None:
        """A server that needs a token and got none (or another): say so now, before any sampling."""
        url = self.url + "/health"
        if health.get("token_required") and not self.token:
            raise RewardError(
                f"remote reward at {url} requires a token and none is set: set {TOKEN_ENV} on this machine to the "
                "server's token"
            )
        if health.get("token_ok") is False:
            raise RewardError(
                f"remote reward at {url} refused the token: set {TOKEN_ENV} on this machine to the server's token"
            )

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
            except requests.exceptions.ChunkedEncodingError as err:  # the connection broke in the middle of the answer
                problem = f"the connection broke during the answer ({str(err)[:200]})"
                continue
            if answer.status_code >= 500:
                problem = f"server error {answer.status_code}: {answer.text[:300]}"
                continue
            if answer.status_code >= 400:
                hint = ""
                if answer.status_code == 401:
                    given = "none is set" if not self.token else "the one set is not the server's"
                    hint = f" (the server needs a token and {given}: set {TOKEN_ENV} to the server's token)"
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
        try:
            check_limits(list(images.shape), self.limits.get("max_batch"), self.limits.get("max_image_size"))
        except BatchTooLarge as err:
            raise RewardError(f"remote reward at {self.url}/score: {err}") from None
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
