"""Sharded training (FSDP2 through accelerate) on the CPU: two processes over gloo, each holding half of the trained
denoiser, launched the way a user launches it (``accelerate launch --use_fsdp --fsdp_version 2``).

Two runs are shared by the tests (module fixtures), to keep the suite short:

* the tiny LoRA run of :func:`conftest.ddp_tiny_run`'s config (DDPO), sharded and launched as two machines of one
  process each (``--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1``): 2 epochs, then a copy resumed from
  its first checkpoint, again as two machines;
* a sharded full fine-tuning with DiffusionNFT (an old policy beside the sharded one) and a KL to the frozen
  reference (itself sharded), with held-out evaluations whose 3 chunks do not split evenly over the 2 processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_overrides, record_pipeline_loads
from safetensors.torch import load_file

from ddpo.training.checkpoint import weights_sha256

FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_machines(args: list[str], cwd: Path) -> list[tuple[int, str, str]]:
    """The same launch as two machines of one process each on this host (``--num_machines 2 --machine_rank R
    --main_process_ip 127.0.0.1``): ``(exit code, stdout, stderr)`` of machine 0 and machine 1. Without accelerate's
    ``fsdp_cpu_ram_efficient_loading`` (on by default: process 0's weights are loaded into every shard), so that each
    process shards its own copy, and LoRA's initialisation must be made equal by ddpo."""
    command = [*ACCELERATE, *FSDP, "--fsdp_cpu_ram_efficient_loading", "false"]
    command += ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(_free_port())]
    machines = [
        subprocess.Popen(
            [*command, "--machine_rank", str(rank), "-m", "ddpo.cli", *args],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [m.communicate(timeout=400) for m in machines]
    return [(m.returncode, *out) for m, out in zip(machines, outputs, strict=True)]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sharded_lora(fast_settings, tmp_path_factory) -> dict[str, Path | str]:
    """The sharded two-machine LoRA run (``run``, 2 epochs), its copy resumed from checkpoint_000001 (``resumed``) and
    machine 0's output of the first launch (``stdout``)."""
    root = tmp_path_factory.mktemp("sharded_lora")
    overrides = cli_overrides(fast_settings, root / "runs")
    machines = _two_machines(["train", "--preset", "tiny", "num_epochs=2", *overrides], root)
    assert [code for code, _, _ in machines] == [0, 0], machines[0][2][-3000:] + machines[1][2][-3000:]
    run, resumed = root / "runs" / "run", root / "runs" / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint_000002")
    shutil.rmtree(resumed / "final")
    again = _two_machines(["train", "--resume", str(resumed)], root)
    assert [code for code, _, _ in again] == [0, 0], again[0][2][-3000:] + again[1][2][-3000:]
    assert "resuming" in again[0][1] and "from checkpoint_000001" in again[0][1], again[0][1][-2000:]
    return {"run": run, "resumed": resumed, "stdout": machines[0][1]}


@pytest.fixture(scope="module")
def sharded_full(fast_settings, tmp_path_factory) -> dict[str, Path]:
    """The sharded full fine-tuning (NFT, KL to the frozen reference, held-out evaluations of 3 chunks), 1 epoch,
    launched with ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2`` (``run``), and beside it, at the
    same time, the same config data parallel (``ddp``, torchrun)."""
    root = tmp_path_factory.mktemp("sharded_full")
    settings = {**fast_settings, "train.learning_rate": 1e-4}
    extra = ["model.use_lora=false", "train.algorithm=nft", "train.kl_coef=0.1", "sample.scheduler=ddim"]
    extra += ["eval_prompts=simple_animals", "eval_samples=6", "log_images=false"]
    train = ["train", "--preset", "tiny", "num_epochs=1", *cli_overrides(settings, root / "runs"), *extra]
    sharded = [*ACCELERATE, *FSDP, "--num_processes", "2", "--num_machines", "1", "--main_process_port"]
    sharded += [str(_free_port()), "-m", "ddpo.cli", *train]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    ddp += ["-m", "ddpo.cli", *train[: -len(extra)], *extra, "run_name=ddp"]
    launches = [
        subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command, env in ((sharded, ENV), (ddp, dict(ENV, ACCELERATE_USE_CPU="true")))
    ]
    (out, err), (_, ddp_err) = (launch.communicate(timeout=400) for launch in launches)
    assert launches[0].returncode == 0, err[-3000:]
    assert launches[1].returncode == 0, ddp_err[-3000:]
    assert "ddpo: 2 processes on cpu (FSDP, gloo)" in out, out[-2000:]
    return {"run": root / "runs" / "run", "ddp": root / "runs" / "ddp"}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-9)


@pytest.mark.slow
def test_sharded_run_equals_the_ddp_run(sharded_lora, ddp_tiny_run):
    """The same config sharded (FSDP2) and data parallel (DDP) trains the same model up to float rounding: every
    metric of every epoch within rel 1e-3 (the losses and KLs are differences of nearly equal log-probs, ~1e-5 and
    ~1e-10, so their relative rounding is the largest), and the final weights differ by less than 1% of what the
    last epoch changed them (L2; measured 1.2e-4, the largest single difference 1.4e-4 at learning rate 1e-2). They
    are not bit-identical: the gradients are reduce-scattered instead of all-reduced and their norm is summed from
    the shards', in other orders; Adam divides by the root of the second moment, so where a gradient is near zero a
    rounding difference can move a weight by a good part of a step: a per-weight bound would be the step size, the
    norm of the difference is the measure that means "the same training"."""
    assert "ddpo: 2 processes on cpu (FSDP, gloo)" in sharded_lora["stdout"], sharded_lora["stdout"][-2000:]
    sharded, ddp = _metrics(sharded_lora["run"]), _metrics(ddp_tiny_run)
    assert [m["epoch"] for m in sharded] == [m["epoch"] for m in ddp] == [0, 1]
    for ours, theirs in zip(sharded, ddp, strict=True):
        numbers = [k for k, v in theirs.items() if isinstance(v, (int, float)) and not k.endswith("_seconds")]
        assert len(numbers) > 10 and set(numbers) <= set(ours)
        differ = {k: (ours[k], theirs[k]) for k in numbers if not _close(ours[k], theirs[k])}
        assert not differ, differ
    name = "checkpoints/checkpoint_{:06d}/trainable.safetensors"
    ours, theirs = load_file(sharded_lora["run"] / name.format(2)), load_file(ddp_tiny_run / name.format(2))
    before = load_file(ddp_tiny_run / name.format(1))
    assert ours.keys() == theirs.keys()
    difference = sum((ours[k] - theirs[k]).double().square().sum() for k in ours) ** 0.5
    last_epoch = sum((theirs[k] - before[k]).double().square().sum() for k in ours) ** 0.5
    assert difference < 1e-2 * last_epoch, (difference, last_epoch)


@pytest.mark.slow
def test_each_process_holds_half_of_every_parameter(sharded_lora, sharded_full, tiny_model_dir):
    """Measured in each process from the storage of its parameters (metrics.jsonl, every epoch): half of the
    denoiser's parameter bytes, and half of every single parameter (the tiny UNet's leading dimensions are even, so
    no shard is padded). The full size is counted here on an unsharded model."""
    from diffusers import UNet2DConditionModel

    from ddpo.models import add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    full_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())  # full fine-tuning
    add_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])  # the tiny preset's adapter
    lora_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    for metrics, total in ((_metrics(sharded_lora["run"]), lora_bytes), (_metrics(sharded_full["run"]), full_bytes)):
        for m in metrics:
            assert m["param_bytes"] == [total // 2, total // 2], (m["param_bytes"], total)
            assert m["param_share"] == [[0.5, 0.5], [0.5, 0.5]]


@pytest.mark.slow
def test_sharded_resume_is_bit_exact(sharded_lora):
    """Resumed from its first checkpoint (two machines again), the sharded run ends where the uninterrupted one does,
    bit for bit: trained weights (the same file), the full optimiser state's tensors, and metrics (timings apart);
    weights_sha256 is the full weights' hash."""
    run, resumed = sharded_lora["run"], sharded_lora["resumed"]
    name = "checkpoints/checkpoint_000002/trainable.safetensors"
    assert (run / name).read_bytes() == (resumed / name).read_bytes()
    optimizers = [
        torch.load(r / "checkpoints/checkpoint_000002/optimizer.pt", weights_only=True) for r in (run, resumed)
    ]
    assert optimizers[0]["state"].keys() == optimizers[1]["state"].keys()
    for param, state in optimizers[0]["state"].items():
        assert all(torch.equal(value, optimizers[1]["state"][param][key]) for key, value in state.items()), param
    hyper = [{k: list(v) if k == "betas" else v for k, v in o["param_groups"][0].items()} for o in optimizers]
    assert hyper[0] == hyper[1]  # (betas come back from a load as a list)
    state = json.loads((run / "checkpoints/checkpoint_000002/state.json").read_text())
    assert state["sharded"] is True and state["num_processes"] == 2
    timeless = [
        [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in _metrics(r)] for r in (run, resumed)
    ]
    assert timeless[0] == timeless[1]
    for epoch, m in enumerate(_metrics(run)):
        saved = load_file(run / "checkpoints" / f"checkpoint_{epoch + 1:06d}" / "trainable.safetensors")
        assert m["weights_sha256"] == [weights_sha256(saved)]
    optimizer = torch.load(run / "checkpoints/checkpoint_000002/optimizer.pt", weights_only=True)
    full = {name: t.shape for name, t in saved.items()}
    assert {name: s["exp_avg"].shape for name, s in optimizer["state"].items()} == full  # full, not a shard


def _unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


@pytest.mark.slow
def test_sharded_lora_final_loads_in_plain_diffusers(sharded_lora, tiny_model_dir):
    """final/ of the sharded LoRA run is the full adapter: diffusers' own pipeline loads it with load_lora_weights and
    its UNet computes what the base UNet with the trained weights of the last checkpoint computes."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ddpo.models import add_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(sharded_lora["run"] / "final")
    trained = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    add_lora(trained, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    weights = load_file(sharded_lora["run"] / "checkpoints/checkpoint_000002/trainable.safetensors")
    assert not trained.load_state_dict(weights, strict=False).unexpected_keys
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert not torch.allclose(_unet_output(trained), _unet_output(base), atol=1e-5)  # training changed it
    torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(trained), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_full_fine_tuning_trains_with_its_old_policy_and_reference(sharded_full, tiny_model_dir):
    """The sharded full fine-tuning: final/ loads with from_pretrained in plain diffusers and its UNet is the trained
    one of the last checkpoint; the old policy (extra.safetensors) is full; the KL to the sharded reference was
    computed; both held-out evaluations ran although their 3 chunks split 2 + 1 over the processes."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    run = sharded_full["run"]
    pipe = StableDiffusionPipeline.from_pretrained(run / "final", safety_checker=None)
    trained = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    checkpoint = run / "checkpoints/checkpoint_000001"
    trained.load_state_dict(load_file(checkpoint / "trainable.safetensors"))  # every parameter, strict
    torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(trained), rtol=0, atol=0)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert not torch.allclose(_unet_output(trained), _unet_output(base), atol=1e-6)
    old = load_file(checkpoint / "extra.safetensors")
    shapes = {name: p.shape for name, p in base.named_parameters()}
    assert {name.removeprefix("old_policy."): t.shape for name, t in old.items()} == shapes
    (metrics,) = _metrics(run)
    assert metrics["kl"] > 0 and math.isfinite(metrics["kl"]) and "old_policy_decay" in metrics
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["samples"]) for e in evals] == [(0, 6), (1, 6)]


@pytest.mark.slow
def test_sharded_full_fine_tuning_equals_its_ddp_run(sharded_full, tiny_model_dir):
    """The sharded full fine-tuning with its sharded old policy (swapped into the sharded weights to sample and to
    score) and its sharded KL reference trains what the same config trains data parallel: metrics within rel 1e-3,
    weights within 1% of what training changed them (L2; measured 6.8e-4: gradient clipping is active, so the
    clipped step also carries the gradient norm's rounding). Tried by hand: when the model keeps the weights it
    gathered for a call across the old policy's swap (Policy.weights_changed doing nothing), the KL here differs by
    22% and the weights by 4.2e-2 of their change."""
    from diffusers import UNet2DConditionModel

    sharded, ddp = _metrics(sharded_full["run"]), _metrics(sharded_full["ddp"])
    for ours, theirs in zip(sharded, ddp, strict=True):
        numbers = [k for k, v in theirs.items() if isinstance(v, (int, float)) and not k.endswith("_seconds")]
        assert {"loss", "kl", "old_deviation", "grad_norm"} <= set(numbers) <= set(ours)
        differ = {k: (ours[k], theirs[k]) for k in numbers if not _close(ours[k], theirs[k])}
        assert not differ, differ
    name = "checkpoints/checkpoint_000001/trainable.safetensors"
    ours, theirs = load_file(sharded_full["run"] / name), load_file(sharded_full["ddp"] / name)
    base = dict(UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").named_parameters())
    difference = sum((ours[k] - theirs[k]).double().square().sum() for k in ours) ** 0.5
    trained = sum((theirs[k] - base[k].detach()).double().square().sum() for k in ours) ** 0.5
    assert difference < 1e-2 * trained, (difference, trained)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumed_without_sharding_is_refused(sharded_lora, tmp_path, capsys, monkeypatch):
    """A sharded run's checkpoint keeps its optimiser state by parameter name; resumed by a launch without FSDP it is
    refused with one line that says how to resume, before the model loads."""
    from ddpo.cli import main

    run = tmp_path / "run"
    shutil.copytree(sharded_lora["run"], run)
    loads = record_pipeline_loads(monkeypatch)
    assert main(["train", "--resume", str(run), "num_epochs=3"]) == 2
    assert loads == []
    err = capsys.readouterr().err
    assert "was written by a sharded (FSDP2) run and this one is launched without FSDP" in err, err[-2000:]
    assert "Traceback" not in err


SHARED_CHECK = """
import sys
from pathlib import Path
from accelerate import Accelerator
from ddpo.training.config import ConfigError
from ddpo.training.processes import check_shared_run_dir

accelerator = Accelerator(cpu=True)
try:
    check_shared_run_dir(accelerator, Path("runs/run"))
except ConfigError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.slow
def test_machines_that_do_not_share_the_run_directory_are_refused(tmp_path):
    """Two machines of one process each (``LOCAL_WORLD_SIZE=1``, as a launcher on each would start them) whose
    relative run directory lands in a different folder on each (their working directories differ, as two machines'
    disks would): the check the trainer makes before the model loads (``check_shared_run_dir``) stops both, naming
    the process that cannot see the run directory; machine 0's marker is gone. Run as a small script (torch and
    accelerate only, no model code: the trainer's call of it is one line), to keep the suite short."""
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="1")
    machines = []
    for rank in (0, 1):
        (tmp_path / f"machine{rank}" / "runs").mkdir(parents=True)
        machines.append(
            subprocess.Popen(
                [sys.executable, "-c", SHARED_CHECK],
                cwd=tmp_path / f"machine{rank}",
                env=dict(env, RANK=str(rank), LOCAL_RANK="0"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = [machine.communicate(timeout=300)[1] for machine in machines]
    for machine, err in zip(machines, errors, strict=True):
        assert machine.returncode == 2, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("the run directory runs/run is not shared by the machines of this run: process 1 on ")
        assert "process 0 on" not in line
    assert not list((tmp_path / "machine0" / "runs").iterdir())  # machine 0 removed its marker
