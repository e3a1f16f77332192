"""scripts/diagnostics/ on the shipped world model, cut down: reward_spread.py's table against the spread of plain
diffusers samples computed by hand, score_scales.py's against DDIM's equations, gradient_noise.py's per-sample
gradients against one batched autograd call, shared_noise.py's columns against plain diffusers draws, and the
diagnosis's experimental reward (experimental_rewards.py) against rendered scenes."""

from __future__ import annotations

import runpy
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from ddpo.models import load_pipeline
from ddpo.tools.diagnostics import score_scales

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "scripts" / "diagnostics" / name), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def script_refusal(name: str, *args: str, capsys, monkeypatch) -> str:
    """The one-line refusal (stderr) of ``scripts/diagnostics/NAME ARGS``, run in this process: its arguments are
    checked before any model loads, so a subprocess would spend its time importing torch."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "diagnostics" / name), run_name="__main__")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] and not cells[0].startswith("-"):
            rows[cells[0]] = cells[1:]
    return rows


SPREAD = ["--count", "3", "--seeds", "2", "--steps", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def spread_table() -> str:
    """One run of reward_spread.py on 3 prompts x 2 seeds x 3 DDIM steps (shared by the tests below)."""
    return run_script("reward_spread.py", *SPREAD)


def test_reward_spread_script_table_is_the_spread_of_plain_diffusers_samples(spread_table):
    """Every number of the table is the spread, computed here by hand in float64, of the ``world`` reward's checks on
    the same grid sampled with plain diffusers: the shipped world model ``from_pretrained`` with a DDIM scheduler,
    3 steps, eta 1, guidance 5 with an empty negative prompt, seeds 0 and 1 of each of the set's fixed 3 prompts."""
    from diffusers import DDIMScheduler

    import world
    from ddpo.training.evaluation import eval_prompt_list
    from ddpo.training.prompts import load_prompts
    from rewards.world import WorldReward

    prompts = eval_prompt_list(load_prompts("world_train"), 3)
    pipe = world.load_world_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad():
        for prompt in prompts:
            generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
            images.append(pipe([prompt] * 2, generator=generators, num_inference_steps=3, guidance_scale=5.0,
                               negative_prompt=[""] * 2, eta=1.0, output_type="pt").images)  # fmt: skip
    details = WorldReward().details(torch.cat(images), [p for p in prompts for _ in range(2)])
    rows = table_rows(spread_table)
    assert rows.keys() == {"total", "colour", "shape", "count", "background"}
    for name, printed in rows.items():
        grid = details[name].double().view(3, 2)
        within, total = grid.var(dim=1, unbiased=False).mean(), grid.var(unbiased=False)
        expected = {
            "mean": grid.mean(),
            "within_share": within / total if total > 0 else 0.0,
            "within_var": within,
            "tied": (grid[:, 0] == grid[:, 1]).double().mean(),
            "never": (grid == 0).all(dim=1).double().mean(),
            "always": (grid == 1).all(dim=1).double().mean(),
        }
        for (key, value), cell, digits in zip(expected.items(), printed, (3, 2, 4, 2, 2, 2)):
            assert float(cell) == pytest.approx(float(value), abs=0.51 * 10**-digits), f"{name} {key}"


def test_reward_spread_script_with_shared_initial_noise(spread_table):
    """--share-initial-noise runs and prints the same table, labelled (that a group's samples then share exactly one
    x_T is tested on the trainer's sampler in test_sampling.py)."""
    shared = run_script("reward_spread.py", *SPREAD, "--share-initial-noise")
    assert "sharing x_T" in shared and "sharing x_T" not in spread_table
    assert table_rows(shared).keys() == table_rows(spread_table).keys()


def test_reward_spread_branch_callback_shares_the_first_samples_state_after_k_steps():
    sys.path.insert(0, str(ROOT / "scripts" / "diagnostics"))
    try:
        from reward_spread import share_state_after
    finally:
        sys.path.remove(str(ROOT / "scripts" / "diagnostics"))
    latents = torch.randn(3, 4, 2, 2)
    callback = share_state_after(2)
    assert torch.equal(callback(None, 0, 901, {"latents": latents})["latents"], latents)  # after step 1: unchanged
    shared = callback(None, 1, 801, {"latents": latents})["latents"]  # after step 2: every sample is sample 0
    assert shared.shape == latents.shape and all(torch.equal(shared[j], latents[0]) for j in range(3))


def test_reward_spread_script_branching_after_the_last_step_leaves_no_spread(capsys, monkeypatch):
    """Samples that share their state after every step are one image: no variance within any prompt; branching
    after K < 1 or K > steps is refused with the option that does the first, and so is --branch-after with
    --share-initial-noise (which it makes moot)."""
    out = run_script(
        "reward_spread.py", "--count", "2", "--seeds", "2", "--steps", "3", "--threads", "1", "--branch-after", "3"
    )
    assert "sharing the state after 3 of 3 steps" in out
    for name, (_mean, _share, within_var, tied, *_rest) in table_rows(out).items():
        assert float(within_var) == 0 and float(tied) == 1, name
    refused = partial(script_refusal, "reward_spread.py", capsys=capsys, monkeypatch=monkeypatch)
    for k in ("0", "4"):
        assert "--share-initial-noise" in refused("--steps", "3", "--branch-after", k)
    assert "drop --share-initial-noise" in refused("--steps", "3", "--branch-after", "1", "--share-initial-noise")


def test_reward_spread_script_needs_two_seeds(capsys, monkeypatch):
    assert "at least 2" in script_refusal("reward_spread.py", "--seeds", "1", capsys=capsys, monkeypatch=monkeypatch)


def test_score_scales_script_prints_the_analytic_scales_and_positive_norms():
    """The score scale column is ``|d mean / d eps_hat| / sigma_t`` of each DDIM step (eta 1), derived here in float64
    from DDIM's equations (DESIGN: ``mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat``,
    ``x0_hat = (x - sqrt(1 - abar) eps_hat) / sqrt(abar)``) on the world model's published schedule."""
    from diffusers import DDIMScheduler

    out = run_script("score_scales.py", "--samples", "1", "--steps", "4")
    rows = table_rows(out)
    scheduler = DDIMScheduler.from_pretrained(ROOT / "world" / "assets" / "world_model", subfolder="scheduler")
    scheduler.set_timesteps(4)
    abars = scheduler.alphas_cumprod.double()
    steps = [rows[str(j)] for j in range(4)]
    for row, t in zip(steps, scheduler.timesteps.tolist()):
        prev = t - 1000 // 4
        abar, abar_prev = abars[t], abars[prev] if prev >= 0 else abars[0]  # set_alpha_to_one: false
        sigma = ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        slope = -abar_prev.sqrt() * (1 - abar).sqrt() / abar.sqrt() + (1 - abar_prev - sigma**2).sqrt()
        assert int(row[0]) == t
        assert float(row[1]) == pytest.approx((slope.abs() / sigma).item(), abs=1e-3)
    assert all(float(r[2]) > 0 for r in steps)
    assert [float(r[1]) for r in steps] == pytest.approx(score_scales(scheduler, "ddim", 4).tolist(), abs=1e-3)


def test_background_fraction_reward_counts_background_pixels():
    """Renders of known scenes: the fraction equals the share of pixels drawn in the background colour (objects and
    their anti-aliased edges excluded), and the world check passes exactly when it is at least one half."""
    sys.path.insert(0, str(ROOT / "scripts" / "diagnostics"))
    try:
        from experimental_rewards import BackgroundFraction
    finally:
        sys.path.remove(str(ROOT / "scripts" / "diagnostics"))
    import world

    captions = world.split_captions()[1][:8]
    images, _ = world.render_captions(captions, seed=3)
    reward = BackgroundFraction()
    fraction = reward(images, captions)
    for image, caption, value in zip(images, captions, fraction):
        colour = torch.tensor(world.BACKGROUNDS[world.parse_caption(caption)[1]]).view(3, 1, 1)
        exact = (image - colour).abs().amax(0).lt(1e-3).float().mean()
        assert exact - 0.03 <= value <= exact + 0.03
    assert reward.last_info()["reward/world_background_mean"] == (fraction >= 0.5).float().mean().item()
    # Against another background colour than the one drawn, almost no pixel counts.
    other = {b: next(o for o in world.BACKGROUNDS if o != b) for b in world.BACKGROUNDS}
    wrong = [
        c.replace(f"a {b} background", f"a {other[b]} background")
        for c in captions
        for b in [world.parse_caption(c)[1]]
    ]
    assert reward(images, wrong).max() <= 0.02


def test_gradient_noise_per_sample_gradients_sum_to_the_batched_gradient():
    """The per-sample, per-step gradients of log pi that scripts/diagnostics/gradient_noise.py and score_scales.py use
    (ddpo.tools.diagnostics.log_prob_gradients) add up to the gradient of the summed log-prob that one batched UNet call
    computes (independent autograd path), and the script prints the noise-scale table."""
    from ddpo.models import add_lora
    from ddpo.policy.sampling import SamplerSettings, encode_prompts, recompute_step, sample_trajectories
    from ddpo.tools.diagnostics import log_prob_gradients
    from ddpo.training.config import build_config

    torch.manual_seed(0)
    config = build_config(preset="world_ddpo", overrides=["sample.num_steps=3", "train.gradient_accumulation_steps=1"])
    s = config.sample
    pipe = load_pipeline("world", None, "ddim")
    add_lora(pipe.unet, 2, 2.0, ["to_q", "to_v"])
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    with torch.no_grad():  # B starts at zero; give it values so the A matrices get gradients too
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    prompts = ["a red circle on a white background", "a blue square and a green triangle on a black background"]
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, "cpu")
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], "cpu")
    settings = SamplerSettings("ddim", 3, s.guidance_scale, s.eta)
    generator = torch.Generator().manual_seed(1)
    traj = sample_trajectories(pipe.unet, pipe.vae, pipe.scheduler, embeds, negative, prompts, generator, settings)
    grads = log_prob_gradients(pipe.unet, pipe.scheduler, traj, params, settings)
    assert grads.shape == (2, 3, sum(p.numel() for p in params))
    for j in range(3):
        steps = torch.full((2,), j)
        out = recompute_step(
            pipe.unet, pipe.scheduler, traj.latents[:, j], traj.latents[:, j + 1], traj.timesteps[steps],
            embeds, negative, settings,
        )  # fmt: skip
        batched = torch.cat([g.flatten() for g in torch.autograd.grad(out.log_prob.sum(), params)])
        # float32 convolutions of batch 1 and batch 2 round differently: compare as vectors
        assert (grads[:, j].sum(0) - batched).norm() <= 1e-3 * batched.norm()
        assert grads[:, j].norm() > 0

    out = run_script(
        "gradient_noise.py", "--samples", "32", "--set", "sample.num_steps=3", "train.gradient_accumulation_steps=1",
        "--threads", "1",
    )  # fmt: skip
    rows = table_rows(out)
    assert {"step 0", "step 1", "step 2", "all steps", "early half", "late half"} <= rows.keys()
    for key in ("step 0", "all steps"):
        g2, g2_upper, trace, _, _ = (float(x.replace(",", "")) for x in rows[key])
        assert trace > 0 and g2_upper >= g2  # real per-sample terms; the bound lies above the estimate


def test_shared_noise_script_columns_are_plain_diffusers_draws():
    """The shared column draws every prompt of a seed from ``Generator().manual_seed(seed)``, the other column each
    image from its own noise seed; both against plain diffusers and a brightness computed by hand."""
    from diffusers import DDIMScheduler

    from ddpo.tools.sample import noise_seeds
    from ddpo.training.evaluation import eval_prompt_list
    from ddpo.training.prompts import load_prompts

    out = run_script(
        "shared_noise.py", "--model", "tiny", "--reward", "brightness", "--count", "3", "--seeds", "4", "5",
        "--scheduler", "ddim", "--steps", "2", "--threads", "1",
    )  # fmt: skip
    rows = table_rows(out)
    prompts = eval_prompt_list(load_prompts("world_heldout"), 3)
    pipe = load_pipeline("tiny")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def brightness(generator_seeds: list[int]) -> float:
        values = []
        for prompt, seed in zip(prompts, generator_seeds):
            image = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=2,
                         guidance_scale=1.0, output_type="pt").images[0]  # fmt: skip
            luma = 0.2126 * image[0] + 0.7152 * image[1] + 0.0722 * image[2]  # Rec. 709
            values.append(luma.mean().item())
        return sum(values) / len(values)

    for seed in (4, 5):
        shared, own = (float(v) for v in rows[str(seed)])
        assert shared == pytest.approx(brightness([seed] * 3), abs=1e-4)
        assert own == pytest.approx(brightness(noise_seeds(prompts, [seed] * 3)), abs=1e-4)
        assert shared != own
