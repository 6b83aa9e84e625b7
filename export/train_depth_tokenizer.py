"""Train the depth tokenizer on depth images of the simulated scene: collect with MuJoCo, fit on the CPU, report.

Data: the robot's "front" camera renders the reference task's scene, each image one episode
of the task (drivers/sim/task.py: its block layout and yaws), the arm either at the episode's
start pose or, for the other half of the images, in a random pose (each arm joint uniform over
the middle `ARM_RANGE_FRACTION` of its range: the arm reaching, in view or out of it, as it is
while the task runs). Everything is drawn from one seeded generator: the same seed gives the
same images and, on the same machine and torch, the same model.

Reported (on held-out images rendered with another seed): the mean absolute reconstruction
error in metres at the tokenizer's resolution, the same for a constant image (the training
mean), the share of the codebook used and its perplexity.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeact.runtime.errors import ConfigError

ARM_RANGE_FRACTION = 0.6
REACHING_SHARE = 0.5                # images with the arm in a random pose rather than the episode's start
HELD_OUT_SEED_OFFSET = 10_000       # held-out images: seed + this, never the training stream
RENDER_PX = (160, 120)              # (width, height): small renders; the tokenizer resizes anyway


@dataclass(frozen=True)
class TrainOptions:
    images: int = 256               # training depth images rendered from the simulator
    held_out: int = 32              # images for the report, rendered with another seed
    steps: int = 400                # optimizer steps
    batch: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    restart_every: int = 25         # steps between dead-code restarts
    restart_until: float = 0.8      # no restarts in the last 20% of training: let the codebook settle
    # torch CPU threads (None: torch's default). One: the convolutions are small, and on a loaded 2-core machine
    # two threads measured 10x slower (220 s against 23 s for 400 steps) as they wait on each other.
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("images", "held_out", "steps", "batch", "restart_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.seed < 0:
            raise ConfigError(f"seed: {self.seed} must be an integer >= 0 (numpy's generators take no negative seed)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate {self.learning_rate} must be a positive number (e.g. 2e-3)")


@dataclass
class TrainReport:
    steps: int
    images: int
    train_seconds: float            # optimizer steps only
    collect_seconds: float          # rendering the training and held-out images
    recon_mae_m: float              # held-out, at input_px x input_px
    constant_mae_m: float           # held-out, predicting the training mean everywhere
    codebook_used: int              # distinct codes on the held-out images
    codebook_size: int
    perplexity: float
    dead_code_restarts: int

    def to_dict(self) -> dict:
        return asdict(self)


def sim_depth_images(n: int, seed: int, size_px: tuple[int, int] = RENDER_PX) -> np.ndarray:
    """(n, H, W) float32 depth in metres of the simulated scene from the robot camera, randomized by `seed`."""
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import reset_world, sample_episode

    rng = np.random.default_rng(seed)
    world = MujocoWorld()           # never started: it stays exactly where it is put
    limits = _arm_limits(world)
    width, height = size_px
    renderer = MujocoRgbdRenderer(world, "front", width, height)
    try:
        out = np.empty((n, height, width), np.float32)
        for i in range(n):
            reset_world(world, sample_episode(int(rng.integers(2**31))))
            if rng.random() < REACHING_SHARE:
                world.set_joint_positions({j: float(rng.uniform(lo, hi)) for j, (lo, hi) in limits.items()})
            out[i] = renderer.render()[1]
        return out
    finally:
        renderer.close()


def _arm_limits(world) -> dict[str, tuple[float, float]]:
    """Each arm joint's middle ARM_RANGE_FRACTION of its range (the wheels are servos too, but unlimited)."""
    limits = {}
    for joint in world.servo_joints:
        j = world.model.joint(joint)
        if not world.model.jnt_limited[j.id]:
            continue
        lo, hi = (float(v) for v in world.model.jnt_range[j.id])
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * ARM_RANGE_FRACTION
        limits[joint] = (mid - half, mid + half)
    return limits


def train_depth_tokenizer(options: TrainOptions = TrainOptions(), config=None, *,
                          images: np.ndarray | None = None, held_out: np.ndarray | None = None,
                          on_step: Callable[[int, float], None] | None = None):
    """(model, TrainReport): collect (unless `images` / `held_out` are given), train, evaluate."""
    import torch

    from edgeact.export.depth_tokenizer import DepthTokenizerConfig, DepthVQVAE

    start = time.perf_counter()
    if images is None:
        images = sim_depth_images(options.images, options.seed)
    if held_out is None:
        held_out = sim_depth_images(options.held_out, options.seed + HELD_OUT_SEED_OFFSET)
    collect_s = time.perf_counter() - start
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    model = DepthVQVAE(config or DepthTokenizerConfig())
    with torch.no_grad():
        data = model.normalize(torch.from_numpy(np.asarray(images, np.float32)))
        model.init_codebook(model.latents(data[:options.batch]).reshape(-1, model.config.code_dim), gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps)
    restarts, last_restart = 0, int(options.steps * options.restart_until)
    # An EMA count this low means the code won less than ~1/10 of its fair share of recent batches.
    min_count = 0.1 * options.batch * model.config.n_codes / model.config.codebook_size
    model.train()
    start = time.perf_counter()
    for step in range(options.steps):
        x = data[torch.randint(0, data.shape[0], (options.batch,), generator=gen)]
        loss, mse, z, codes = model.loss(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        model.update_codebook(z, codes)
        if (step + 1) % options.restart_every == 0 and step + 1 < last_restart:
            restarts += model.restart_dead_codes(z, gen, min_count)
        if on_step is not None:
            on_step(step, float(mse.detach()))
    train_s = time.perf_counter() - start
    model.eval()
    report = evaluate(model, held_out, data.mean().item())
    return model, TrainReport(steps=options.steps, images=len(images), train_seconds=train_s, collect_seconds=collect_s,
                              dead_code_restarts=restarts, **report)


def evaluate(model, depth_m: np.ndarray, constant: float) -> dict:
    """Held-out reconstruction error (m) of the model and of a constant normalized depth, and codebook use."""
    import torch

    from edgeact.export.depth_tokenizer import CodebookStats

    with torch.no_grad():
        x = model.normalize(torch.from_numpy(np.asarray(depth_m, np.float32)))[:, 0]
        codes = model.nearest(model.latents(x[:, None]))
        scale = model.config.max_depth_m
        recon_mae_m = (model.decode(codes)[:, 0].clamp(0, 1) - x).abs().mean().item() * scale
        constant_mae_m = (x - constant).abs().mean().item() * scale
    stats = CodebookStats.of(codes, model.config.codebook_size)
    return {"recon_mae_m": recon_mae_m, "constant_mae_m": constant_mae_m, "codebook_used": stats.used,
            "codebook_size": stats.size, "perplexity": stats.perplexity}


def train_and_save(out_dir: str | Path, options: TrainOptions = TrainOptions(), config=None,
                   on_step: Callable[[int, float], None] | None = None) -> TrainReport:
    """Train on freshly rendered sim depth and save weights + config + report into `out_dir`."""
    from edgeact.export.depth_tokenizer import save_depth_tokenizer

    model, report = train_depth_tokenizer(options, config, on_step=on_step)
    save_depth_tokenizer(model, out_dir, {**report.to_dict(), "options": asdict(options)})
    return report
