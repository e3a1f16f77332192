"""LAION "improved aesthetic predictor": an MLP on the L2-normalised OpenAI CLIP ViT-L/14 image embedding.

The head (``sac+logos+ava1-l14-linearMSE.pth``, Apache-2.0, christophschuhmann/improved-aesthetic-predictor) maps a
768-d embedding to a score of roughly 1..10; Stable Diffusion v1.4 samples score about 5 to 6. It is the reward of
the DDPO paper's aesthetic experiment.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import torch
from torch import nn

from ._clip import DevicePlacement, load_open_clip, preprocess_images, resolve_dtype
from .base import Reward, check_images, register

HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)
HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
HEAD_EMBED_DIM = 768


def default_cache_dir() -> Path:
    """``$DDPO_CACHE`` or ``~/.cache/ddpo``: where downloaded reward weights are kept."""
    return Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo")).expanduser()


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP: ``[B, 768]`` (L2-normalised CLIP embedding) -> ``[B, 1]`` score.

    Layer indices match the published state dict (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``,
    ``layers.7``); the dropouts only matter in training and are kept so the indices line up.
    """

    def __init__(self, input_size: int = HEAD_EMBED_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_aesthetic_head(path: str | os.PathLike) -> AestheticHead:
    """Read the published head file (a plain state dict; ``torch.load(weights_only=True)``) into an eval-mode,
    frozen :class:`AestheticHead` on the CPU in float32."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reward 'aesthetic': head file {str(path)!r} (option head_path) does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    head = AestheticHead()
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, AttributeError) as err:
        raise ValueError(
            f"reward 'aesthetic': {str(path)!r} is not a LAION aesthetic head state dict "
            f"(expected keys layers.0/2/4/6/7 of Linear 768-1024-128-64-16-1): {err}"
        ) from None
    return head.eval().requires_grad_(False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_aesthetic_head(cache_dir: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """Path of the cached head file, downloading it (once, checked against its SHA-256) if absent.

    Offline (or with ``HF_HUB_OFFLINE=1`` / ``DDPO_OFFLINE=1`` set, which skip the download) a missing file raises a
    :class:`FileNotFoundError` that names the file and the ``head_path`` option.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / "aesthetic" / HEAD_FILENAME
    if target.is_file():
        return target
    help_text = (
        f"reward 'aesthetic': the aesthetic head file {HEAD_FILENAME!r} is not cached at {str(target)!r}"
        " and {why}. Download it from {url} (or take it from kvablack/ddpo-pytorch) and either put it at that"
        " path or pass its location as the 'head_path' option (reward.options.head_path: /path/to/{name})."
    )
    offline = any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "DDPO_OFFLINE")
    )
    if offline:
        raise FileNotFoundError(help_text.format(why="offline mode is set", url=HEAD_URL, name=HEAD_FILENAME))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(HEAD_URL, timeout=timeout) as response:
            out.write(response.read())
        digest = _sha256(Path(tmp_name))
        if digest != HEAD_SHA256:
            raise OSError(f"SHA-256 mismatch (got {digest}, expected {HEAD_SHA256})")
        os.replace(tmp_name, target)
    except OSError as err:  # URLError, timeouts and checksum failures are all OSErrors
        Path(tmp_name).unlink(missing_ok=True)
        why = f"the download failed ({' '.join(str(err).split())[:200]})"
        raise FileNotFoundError(help_text.format(why=why, url=HEAD_URL, name=HEAD_FILENAME)) from None
    return target


@register("aesthetic")
class AestheticReward(Reward):
    """LAION aesthetic score of each image (higher = prettier, roughly 1..10). Differentiable w.r.t. the pixels.

    Options:
        clip_model: open_clip architecture of the backbone. The head was trained on OpenAI ``"ViT-L-14"``; any
            other model must give 768-d embeddings and scores are then meaningless except for tests.
        clip_pretrained: open_clip pretrained tag (``"openai"``, fetched into the hub cache on first use) or the
            path of a local checkpoint file of the backbone (e.g. ``open_clip_model.safetensors`` from the hub repo
            ``timm/vit_large_patch14_clip_224.openai``).
        head_path: local path of ``sac+logos+ava1-l14-linearMSE.pth``. Default: downloaded once into
            ``cache_dir/aesthetic/``.
        cache_dir: cache for the downloaded head (default ``$DDPO_CACHE`` or ``~/.cache/ddpo``).
        quick_gelu: QuickGELU activations in the backbone (OpenAI CLIP uses them; keep ``True`` for the real
            model). ``None``: as the pretrained tag says.
        device: where to score (default: the images' device, chosen on the first call).
        dtype: backbone precision, ``"float32"`` | ``"float16"`` | ``"bfloat16"``; the head always runs in float32.

    Input ``images [B, 3, H, W]`` in ``[0, 1]`` (any size: resized and centre-cropped to the backbone's input);
    output ``float32 [B]``.
    """

    name = "aesthetic"

    #: Tensor-op preprocessing, frozen backbone and head (eval mode, ``requires_grad=False``), no ``no_grad``.
    differentiable = True

    def __init__(
        self,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        head_path: str | None = None,
        cache_dir: str | None = None,
        quick_gelu: bool | None = True,
        device: str | None = None,
        dtype: str = "float32",
    ):
        self.dtype = resolve_dtype(dtype)
        # Resolve the head first: it is the cheaper failure to report.
        head_file = Path(head_path).expanduser() if head_path is not None else fetch_aesthetic_head(cache_dir)
        self.head = load_aesthetic_head(head_file)
        self.model, self.preprocess_cfg = load_open_clip(
            clip_model, clip_pretrained, option="clip_pretrained", reward="aesthetic", quick_gelu=quick_gelu
        )
        embed_dim = self.model.visual.output_dim
        if embed_dim != HEAD_EMBED_DIM:
            raise ValueError(
                f"reward 'aesthetic': clip_model {clip_model!r} gives {embed_dim}-d image embeddings; the LAION head "
                f"needs {HEAD_EMBED_DIM}-d (OpenAI CLIP ViT-L-14)"
            )
        self._placement = DevicePlacement(device, self.dtype)
        self._head_placement = DevicePlacement(device, torch.float32)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> L2-normalised float32 embeddings ``[B, 768]`` on the scoring device."""
        check_images(images)
        device = self._placement.place(self.model, images)
        # Preprocess in float32 (resampling kernels lack half-precision CPU versions), run the model in self.dtype.
        pixels = preprocess_images(images.to(device=device, dtype=torch.float32), self.preprocess_cfg).to(self.dtype)
        embeddings = self.model.encode_image(pixels).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = self.embed(images)
        self._head_placement.place(self.head, embeddings)
        scores = self.head(embeddings).squeeze(-1)
        return scores.to(device=images.device, dtype=torch.float32)
