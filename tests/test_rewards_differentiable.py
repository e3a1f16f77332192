"""Which rewards are differentiable (``Reward.differentiable``), and that those that say so really are: called under
``torch.enable_grad()`` they give the same values bit for bit as under ``no_grad``, a gradient w.r.t. the pixels that
matches finite differences, and no gradient to their own weights.

Every reward here is the real one on real (tiny or shipped) weights: the world CLIP shipped in ``world/assets``,
tiny open_clip / transformers CLIP models built from configs and loaded through each reward's local-checkpoint
option, and the real LAION aesthetic head from ``../shared/fixtures``.

Finite differences. The rewards return float32 by contract and compute in float32 (they cast the images), so the
check cannot be finer than the rounding of the two float32 values: for a direction ``d`` (float64: N(0, 1) per
pixel plus the gradient's direction, see below), ``x± = float32(x ± eps·d)``, the measured ``f(x+) - f(x-)`` (in float64) is compared with the predicted
``<grad f(x), x+ - x->`` (float64 sum) within ``RTOL·|predicted| + ATOL_ULPS·ulp(|f|)``:

* ``ATOL_ULPS = 8`` float32 ulps of the value: the two outputs are each rounded (half an ulp) after a float32
  computation of a few dozen ops (a few ulps of accumulated error); measured worst 3.4 ulps;
* ``RTOL = 1e-2``: the central difference's truncation error (O(eps²·f''')) and, for the rewards with kinks
  (saturation's max/min, the discriminator's LeakyReLU), units crossing a kink; each reward's ``eps`` is chosen so
  that these stay at most ~1e-2 (measured) while the change is far above the rounding;
* and each direction must move the value by at least ``POWER`` times the absolute tolerance, so the comparison
  can fail (a gradient off by a few percent, of the wrong sign or missing a term fails it).
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rewards
from rewards import FunctionReward, Reward, differentiability, get_reward, is_differentiable, listing
from rewards._clip import register_tiny_open_clip_config

SHARED = Path(__file__).resolve().parents[2] / "shared"
HEAD_FILE = SHARED / "fixtures" / "laion-aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"

PROMPTS = ["a red circle", "two blue squares on a white background"]

RTOL = 1e-2
ATOL_ULPS = 8
POWER = 20
DIRECTIONS = 3

#: What the spec says each registered reward declares (``ddpo rewards`` shows this column).
EXPECTED = {
    "aesthetic": "yes",  # tensor-op preprocessing, frozen CLIP + head
    "brightness": "yes",
    "clip_diversity": "no",  # a set measure (each image against the others of its group), scored under no_grad
    "clip_score": "yes",  # image path with gradients; the text embeddings are constants
    "colorfulness": "yes",
    "contrast": "yes",
    "discriminator": "yes",  # its logit w.r.t. the pixels, weights detached (see rewards/discriminator.py)
    "hpsv2": "yes",
    "jpeg_compressibility": "no",  # 8-bit quantisation + PIL encoder
    "jpeg_incompressibility": "no",
    "pickscore": "yes",
    "remote": "no",  # pixels go over HTTP
    "saturation": "yes",
    "target_color": "yes",
    "weighted": "if all its components are",
    "world": "no",  # thresholds and connected components under no_grad
}


def test_every_registered_reward_declares_what_the_spec_says():
    # A reward registered later must be added here: the comparison is of the whole table.
    assert dict(listing()) == EXPECTED
    assert [name for name, _ in listing()] == rewards.available()
    for name, expected in EXPECTED.items():
        assert differentiability(name) == expected
    with pytest.raises(ValueError, match="unknown reward"):
        differentiability("no_such_reward")


def test_built_rewards_carry_the_flag():
    for name in ("brightness", "contrast", "saturation", "colorfulness", "target_color"):
        assert get_reward(name).differentiable is True
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "world"):
        assert get_reward(name).differentiable is False
    assert get_reward("remote", url="http://127.0.0.1:9", check=False).differentiable is False
    disc = get_reward("discriminator", reference_images=torch.rand(2, 3, 8, 8), image_size=8, depth=1)
    assert disc.differentiable is True


def _write_module(tmp_path: Path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def test_user_rewards_are_not_differentiable_unless_they_declare_it(tmp_path, monkeypatch):
    def plain(images, prompts):
        return images.mean(dim=(1, 2, 3))

    assert FunctionReward(plain).differentiable is False
    assert is_differentiable(plain) is False
    plain.differentiable = True  # a function object that declares it is honoured
    assert FunctionReward(plain).differentiable is True

    class Loose:  # anything but the value True is not a declaration
        differentiable = "yes"

        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    assert FunctionReward(Loose()).differentiable is False

    _write_module(
        tmp_path,
        monkeypatch,
        "ddpo_test_user_rewards",
        """
        import torch
        import rewards

        @rewards.reward_function
        def plain(images, prompts):
            return images.float().mean(dim=(1, 2, 3))

        @rewards.reward_function(differentiable=True)
        def smooth(images, prompts):
            return images.float().mean(dim=(1, 2, 3))

        class Declared(rewards.Reward):
            differentiable = True

            def __call__(self, images, prompts):
                return images.float().mean(dim=(1, 2, 3))

        class Undeclared(rewards.Reward):
            def __call__(self, images, prompts):
                return images.float().mean(dim=(1, 2, 3))
        """,
    )
    flags = {
        attr: get_reward(f"ddpo_test_user_rewards:{attr}").differentiable
        for attr in ("plain", "smooth", "Declared", "Undeclared")
    }
    assert flags == {"plain": False, "smooth": True, "Declared": True, "Undeclared": False}
    weighted = get_reward(
        "weighted", components={"brightness": 1.0, "ddpo_test_user_rewards:smooth": 2.0, "contrast": 0.5}
    )
    assert weighted.differentiable is True
    weighted = get_reward("weighted", components={"brightness": 1.0, "ddpo_test_user_rewards:plain": 2.0})
    assert weighted.differentiable is False


# -- gradients ---------------------------------------------------------------------------------------------------------


def generic_images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images away from every kink the rules have: channels well apart (R > G > B by ~0.15, so max/min never swap
    under the perturbations), inside (0, 1) (no clamp in the CLIP preprocessing is active)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.7, 0.45, 0.2]).view(1, 3, 1, 1)
    return base + 0.1 * torch.rand(n, 3, size, size, generator=generator)


def reward_modules(reward: Reward) -> list[torch.nn.Module]:
    found = [value for value in vars(reward).values() if isinstance(value, torch.nn.Module)]
    if isinstance(reward, rewards.weighted.WeightedReward):
        for component in reward.components.values():
            found += reward_modules(component)
    return found


@contextlib.contextmanager
def mha_fastpath(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def check_differentiable(
    reward: Reward, images: torch.Tensor, eps: float, prompts: list[str] = PROMPTS, fused_attention: bool = False
) -> None:
    """The checks every differentiable reward must pass (see the module docstring for the tolerances)."""
    assert reward.differentiable is True
    with torch.no_grad():
        plain = reward(images, prompts)
        with mha_fastpath(False):
            plain_unfused = reward(images, prompts)
    pixels = images.clone().requires_grad_(True)
    with torch.enable_grad():
        values = rewards.check_reward_output(reward(pixels, prompts), len(prompts), reward.name)
    assert values.requires_grad, "the values carry no graph to the pixels"
    # Bit for bit the same computation: with gradients the reward runs exactly what it runs under no_grad. The one
    # exception is torch's own: in eval mode under no_grad, nn.MultiheadAttention (the CLIP transformers) takes a
    # fused "fast path" kernel that autograd cannot use, which rounds differently in the last bits. With that fast
    # path off the values are bit-identical, and with it on they agree to float32 rounding.
    assert torch.equal(values.detach(), plain_unfused), "values with gradients differ from the values under no_grad"
    if fused_attention:
        torch.testing.assert_close(values.detach(), plain, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(values.detach(), plain)
    (grad,) = torch.autograd.grad(values.sum(), pixels)  # samples are scored independently: per-sample gradients
    assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(dim=1) > 0).all()

    # The reward's own weights: frozen (or, for the online discriminator, used detached), in eval mode, and a
    # backward through the values leaves their .grad as it was (None; the discriminator keeps its last update's).
    parameters = [p for module in reward_modules(reward) for p in module.parameters()]
    assert parameters or not reward_modules(reward)
    before = [None if p.grad is None else p.grad.clone() for p in parameters]
    reward(pixels, prompts).sum().backward()
    for module in reward_modules(reward):
        assert not module.training
    for parameter, grad_before in zip(parameters, before):
        if grad_before is None:
            assert parameter.grad is None, "a gradient reached the reward's own weights"
        else:
            assert torch.equal(parameter.grad, grad_before), "a gradient reached the reward's own weights"
        if not isinstance(reward, rewards.discriminator.DiscriminatorReward):
            assert not parameter.requires_grad

    # Under no_grad (how the trainer scores) a differentiable reward builds no graph.
    with torch.no_grad():
        assert not reward(pixels, prompts).requires_grad

    generator = torch.Generator().manual_seed(1)
    for _ in range(DIRECTIONS):
        # A random direction plus, per sample, the gradient's own direction scaled to the same norm: the value then
        # surely moves (a purely random direction can be nearly orthogonal to the gradient, leaving nothing to test),
        # and the random part still probes every pixel.
        direction = torch.randn(images.shape, generator=generator, dtype=torch.float64)
        along = grad.double() / grad.double().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        direction = direction + along * direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        plus = (images.double() + eps * direction).float()
        minus = (images.double() - eps * direction).float()
        with torch.no_grad():
            f_plus, f_minus = reward(plus, prompts).double(), reward(minus, prompts).double()
        measured = f_plus - f_minus
        predicted = (grad.double() * (plus.double() - minus.double())).sum(dim=(1, 2, 3))
        atol = ATOL_ULPS * torch.finfo(torch.float32).eps * torch.maximum(f_plus.abs(), f_minus.abs())
        assert (predicted.abs() > POWER * atol).all(), f"eps={eps} too small to test: {predicted} vs {atol}"
        error = (measured - predicted).abs()
        assert (error <= RTOL * predicted.abs() + atol).all(), (
            f"{reward.name}: gradient disagrees with finite differences: measured {measured.tolist()}, "
            f"predicted {predicted.tolist()}"
        )


RULES = [
    ("brightness", {}, 1e-2),
    ("brightness", {"target": 0.9}, 1e-2),
    ("contrast", {}, 1e-3),
    ("saturation", {}, 1e-2),
    ("colorfulness", {}, 1e-3),
    ("target_color", {"color": "orange"}, 1e-2),
]


@pytest.mark.parametrize("name, options, eps", RULES, ids=[f"{n}{o}" for n, o, _ in RULES])
def test_rules_gradients_match_finite_differences(name, options, eps):
    check_differentiable(get_reward(name, **options), generic_images(), eps)


@pytest.fixture(scope="module")
def world_clip_score() -> Reward:
    return get_reward("clip_score", model="ddpo-world-clip", pretrained="world")


def test_clip_score_on_the_world_clip(world_clip_score):
    check_differentiable(world_clip_score, generic_images(), 1e-3, fused_attention=True)


def test_discriminator_scoring(tmp_path):
    reward = get_reward(
        "discriminator", reference_images=torch.rand(4, 3, 16, 16), image_size=16, channels=8, depth=2, batch_size=2
    )
    reward.update(generic_images(seed=3), PROMPTS)  # trained once: its weights are not the initial ones
    check_differentiable(reward, generic_images(), 1e-4)
    assert all(p.requires_grad for p in reward.model.parameters())  # still trainable by update()


@pytest.mark.skipif(not HEAD_FILE.is_file(), reason=f"aesthetic head fixture not found at {HEAD_FILE}")
def test_aesthetic_on_a_tiny_768_clip(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    name = register_tiny_open_clip_config(tmp_path, "ddpo-test-differentiable-768", embed_dim=768)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    reward = get_reward(
        "aesthetic", clip_model=name, clip_pretrained=str(tmp_path / "tiny.safetensors"), head_path=str(HEAD_FILE)
    )
    check_differentiable(reward, generic_images(), 1e-3, fused_attention=True)


def test_pickscore_on_a_tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from world import build_clip_tokenizer

    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    CLIPModel(config).save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=build_clip_tokenizer()).save_pretrained(tmp_path)
    reward = get_reward("pickscore", model=str(tmp_path), processor=str(tmp_path))
    check_differentiable(reward, generic_images(), 1e-3, fused_attention=True)


def test_hpsv2_on_a_tiny_clip(tmp_path):
    import open_clip

    name = register_tiny_open_clip_config(
        tmp_path, "tiny-differentiable-hps", embed_dim=16, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    reward = get_reward("hpsv2", checkpoint=str(tmp_path / "hps.pt"), model=name)
    check_differentiable(reward, generic_images(), 1e-3, fused_attention=True)


# -- weighted ----------------------------------------------------------------------------------------------------------


def test_weighted_of_differentiable_parts_is_differentiable_with_the_weighted_gradient(world_clip_score):
    weighted = get_reward("weighted", components={"colorfulness": 0.5, "target_color": {"weight": -2.0}})
    assert weighted.differentiable is True
    images = generic_images()
    check_differentiable(weighted, images, 1e-3)

    pixels = images.clone().requires_grad_(True)
    (total,) = torch.autograd.grad(weighted(pixels, PROMPTS).sum(), pixels)
    parts = [
        torch.autograd.grad(get_reward(n)(pixels, PROMPTS).sum(), pixels)[0] for n in ("colorfulness", "target_color")
    ]
    torch.testing.assert_close(total, 0.5 * parts[0] - 2.0 * parts[1], rtol=1e-6, atol=1e-9)

    # A model-based part too (its gradient reaches the pixels through the sum).
    weighted.components["clip_score"], weighted.weights["clip_score"] = world_clip_score, 0.1
    (total,) = torch.autograd.grad(weighted(pixels, PROMPTS).sum(), pixels)
    (clip,) = torch.autograd.grad(world_clip_score(pixels, PROMPTS).sum(), pixels)
    torch.testing.assert_close(total, 0.5 * parts[0] - 2.0 * parts[1] + 0.1 * clip, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("other", ["jpeg_compressibility", "world"])
def test_weighted_with_a_non_differentiable_part_is_not(other):
    assert get_reward("weighted", components={"brightness": 1.0, other: 1.0}).differentiable is False
    assert get_reward("weighted", components={"brightness": 1.0, "contrast": 1.0}).differentiable is True
