"""Expert demonstrations of the reference task as a training set in MolmoAct's answer terms (npz shards + manifest).

One sample per decision step of a successful expert episode (every `stride_actions` actions):
  rgb         (H, W, 3) uint8     the "front" camera's colour image at that moment
  depth_m     (H, W) float32      its aligned depth, metres (0: no data); the depth tokens come from this
  instruction str                 e.g. "push the red block to the left"
  trace       (5, 2) int64        the end effector's future path in this image as MolmoAct writes it:
                                  [x, y] in [0, 256), pixel = x / 255 * (W - 1); rows past trace_len are -1
  trace_len   int                 1..5 points
  actions     (8, 7) float32      the next chunk, raw units of the "ik" mapper (m, rad, gripper in [-1, 1])
  episode, step int               where it came from
  blocks      (3, 2) int64        where each block (COLOURS order) is in this image, in trace units: the centre
                                  of its top face; -1 where it is hidden (the arm in front) or out of view.
                                  Pointing samples ("point to the red block") are made from these.
The manifest holds the image size, the camera intrinsics, every episode's parameters, and the
normalization statistics of all executed actions (q01/q99/mask/mean/std/min/max, gripper unmasked)
under `norm_stats[NORM_KEY]`, the form `ActionStats.from_norm_stats` reads.

The trace: the end-effector site's true positions at 5 action boundaries evenly spaced over the next
`DemoConfig.trace_horizon_actions` actions (default 8: the chunk's boundaries 0, 2, 4, 6, 8, the
last one clipped at the episode's end), projected with the camera's intrinsics and extrinsics
(site "camera_optical", read when the frame is rendered: the camera rides on the base, which the
arm's pushes move a little; the manifest's `camera_optical_pose_base` is the pose every episode
starts from); repeated points (a still arm) are written once. Horizon 0 spans the rest
of the expert's episode instead, as MolmoAct's own traces do (the path to the goal); a reference
ARM trained on those, with siblings, did worse on pushes (see README), so the chunk stays the default.

First chunks: with `DemoConfig.first_chunk_only`, each episode is run for one chunk only (the expert's first
`chunk_size` actions, executed as usual) and only its first sample is kept: the frame before the first action,
the trace over those actions and the chunk itself, the same sample a whole episode's recording starts with
(tested). Its outcome is not known, so every episode is kept. Far cheaper than a whole episode, it gives the
training many more scenes to read the named block's place from (README: "More compute, or more scenes?").

Siblings: with `DemoConfig.siblings` = n, each drawn scene is also demonstrated under up to n other
instructions naming another block (`task.retarget`: same blocks, same arm start, only where that
task could have been drawn). Their first frames are the same image with another answer, which
only the instruction's words explain. Siblings share the scene's `episode` number, so a held-out
split never separates them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeact.drivers.sim.expert import ExpertConfig, run_expert, runtime_action_mapper
from edgeact.drivers.sim.task import (BLOCK_HALF_M, BLOCKS, COLOURS, TEMPLATES, Episode, TaskConfig, retarget,
                                      sample_episode)
from edgeact.runtime.answer import MAX_TRACE_POINTS, pixels_to_trace
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.trace_follow import project_points, trace_boundaries

MANIFEST = "manifest.json"
FORMAT = "edgeact-sim-demos/3"      # 2: + blocks; 3: labels projected from each frame's camera pose
NORM_KEY = "edgeact_sim_reference"
CAMERA, OPTICAL_SITE = "front", "camera_optical"
ARRAYS = ("rgb", "depth_m", "instruction", "trace", "trace_len", "actions", "episode", "step", "blocks")
HIDDEN_TOLERANCE_M = 0.01               # a block's top is hidden where the depth image reads nearer than this


@dataclass(frozen=True)
class DemoConfig:
    width: int = 160
    height: int = 120
    stride_actions: int = 4             # a decision every this many actions (chunks overlap by chunk - stride)
    episodes_per_shard: int = 25
    execution_noise: float = 0.0        # ExpertConfig.execution_noise of the expert (when none is given)
    rotation_noise_rad: float = 0.0     # ... and its rotation_noise_rad
    siblings: int = 0                   # other instructions demonstrated on each scene (see the module docstring)
    trace_horizon_actions: int = 8      # the trace covers this many actions ahead; 0: to the end of the episode
    first_chunk_only: bool = False      # each episode's first sample only, the expert run for one chunk (docstring)

    def __post_init__(self) -> None:
        if not (16 <= self.width <= 640 and 16 <= self.height <= 480):
            raise ConfigError(f"demo image {self.width}x{self.height}: use 16..640 x 16..480 (scene.xml's buffer)")
        if not (1 <= self.stride_actions <= 64 and self.episodes_per_shard >= 1):
            raise ConfigError(f"stride_actions must be in [1, 64] and episodes_per_shard >= 1, got "
                              f"{self.stride_actions}, {self.episodes_per_shard}")
        if not (0 <= self.siblings < len(COLOURS) * len(TEMPLATES) and self.trace_horizon_actions >= 0):
            raise ConfigError(f"siblings must be in [0, {len(COLOURS) * len(TEMPLATES) - 1}] and "
                              f"trace_horizon_actions >= 0, got {self.siblings}, {self.trace_horizon_actions}")
        if self.first_chunk_only and self.trace_horizon_actions == 0:
            raise ConfigError("first_chunk_only records one chunk of each episode, so its trace cannot run to the "
                              "episode's end: give trace_horizon_actions > 0 (at most the chunk size)")


class DemoDatasetError(EdgeactError):
    """A demonstration directory is missing, incomplete or of another format; the message says which."""


def future_trace(ee_positions_m: np.ndarray, k: int, horizon_actions: int,
                 camera_pose: tuple[np.ndarray, np.ndarray], intrinsics: Any) -> np.ndarray:
    """The trace (n, 2) ints in [0, 256) of the end effector from action boundary k over the next horizon_actions
    actions (0: to the last boundary), at evenly spaced boundaries."""
    last = len(ee_positions_m) - 1
    horizon = horizon_actions if horizon_actions > 0 else max(last - k, 0)
    picks = [min(k + b, last) for b in trace_boundaries(horizon)]
    pixels = project_points(ee_positions_m[picks], *camera_pose, intrinsics)
    trace = pixels_to_trace(pixels, intrinsics.width, intrinsics.height)
    keep = [0] + [i for i in range(1, len(trace)) if not np.array_equal(trace[i], trace[i - 1])]
    return trace[keep]


def commanded_trace(world: Any, positions_m: np.ndarray, horizon_actions: int,
                    camera_pose: tuple[np.ndarray, np.ndarray], intrinsics: Any) -> np.ndarray:
    """`future_trace` of commanded end-effector positions (n, 3), the first one now's. Their frame is the arm's
    base's, a translation of the world's: the arm's site now says by how much."""
    to_world = world.site_pose("ee")[0] - positions_m[0]
    return future_trace(positions_m + to_world, 0, horizon_actions, camera_pose, intrinsics)


def block_pixels(world: Any, depth_m: np.ndarray, camera_pose: tuple[np.ndarray, np.ndarray],
                 intrinsics: Any) -> np.ndarray:
    """(len(COLOURS), 2) trace coordinates of each block's top-face centre in this image; -1 where it is hidden
    (the rendered depth there is nearer than the block's top) or outside the image."""
    out = np.full((len(COLOURS), 2), -1, dtype=np.int64)
    height, width = depth_m.shape
    for c, colour in enumerate(COLOURS):
        top = world.body_pose(BLOCKS[colour])[0] + np.array([0.0, 0.0, BLOCK_HALF_M])
        (u, v), = project_points(top[None], *camera_pose, intrinsics)
        col, row = int(round(u)), int(round(v))
        if not (0 <= col < width and 0 <= row < height):
            continue
        z_m = float((top - camera_pose[0]) @ camera_pose[1][:, 2])     # depth along the optical axis
        seen = float(depth_m[row, col])
        if seen > 0 and seen >= z_m - HIDDEN_TOLERANCE_M:
            out[c] = pixels_to_trace(np.array([[u, v]]), width, height)[0]
    return out


def action_statistics(actions: np.ndarray) -> dict[str, list]:
    """q01/q99/mean/std/min/max per dimension of (n, 7) actions, and the mask (the gripper is never scaled)."""
    a = np.asarray(actions, dtype=np.float64)
    mask = [True] * (a.shape[1] - 1) + [False]
    stats = {"q01": np.quantile(a, 0.01, axis=0), "q99": np.quantile(a, 0.99, axis=0), "mean": a.mean(axis=0),
             "std": a.std(axis=0), "min": a.min(axis=0), "max": a.max(axis=0)}
    return {**{k: [float(x) for x in v] for k, v in stats.items()}, "mask": mask}


def sibling_episodes(scene: Episode, n: int, task: TaskConfig | None = None) -> list[Episode]:
    """Up to n other instructions on the scene's layout, each naming another block (order seeded by the scene)."""
    if n <= 0:
        return []
    candidates = [(template, colour) for template in TEMPLATES for colour in COLOURS if colour != scene.colour]
    siblings = []
    for j in np.random.default_rng([scene.seed, 0x51B]).permutation(len(candidates)):
        episode = retarget(scene, *candidates[j], task)
        if episode is not None:
            siblings.append(episode)
            if len(siblings) == n:
                break
    return siblings


@dataclass(frozen=True)
class DemoSummary:
    out_dir: Path
    episodes: int                       # expert episodes written (siblings included): the successful ones, or
                                        # with first_chunk_only every one
    successes: dict[str, list[int]]     # template -> [successes, attempts]
    samples: int
    seconds: float
    bytes_written: int


def record_demos(out_dir: str | Path, episodes: int, seed: int, config: DemoConfig = DemoConfig(),
                 expert: ExpertConfig | None = None, task: TaskConfig | None = None,
                 progress: Callable[[int, int], None] | None = None, workers: int = 1) -> DemoSummary:
    """Run `episodes` expert episodes (templates in turn, episode i from seed + i; each with up to config.siblings
    sibling instructions) and write the successful ones (with config.first_chunk_only: each one's first chunk).

    Each shard holds the successes among `config.episodes_per_shard` consecutive episodes, and every episode is
    seeded by its own index, so `workers` processes (each its own simulator and renderer, one shard's episodes at a
    time) write the same set as one: the expert is single-threaded, and the recipe's 1200 episodes took 544 s in one
    process on a 2-core machine."""
    if workers < 1:
        raise ConfigError(f"workers: {workers}; record with at least 1 process")
    if expert is None:
        rates = runtime_action_mapper()[1]
        expert = ExpertConfig(**rates, execution_noise=config.execution_noise,
                              rotation_noise_rad=config.rotation_noise_rad)
    if config.first_chunk_only:
        if config.trace_horizon_actions > expert.chunk_size:
            raise ConfigError(f"first_chunk_only runs {expert.chunk_size} actions per episode, so a trace over "
                              f"{config.trace_horizon_actions} cannot be drawn: give trace_horizon_actions <= "
                              f"{expert.chunk_size}")
        expert = replace(expert, max_actions=expert.chunk_size)     # the expert stops after its first chunk
    out = _new_set(out_dir, episodes)
    start_s = time.perf_counter()
    per = config.episodes_per_shard
    blocks = [(lo, min(lo + per, episodes)) for lo in range(0, episodes, per)]
    on_done = progress and (lambda done: progress(done, episodes))
    with _recording_aside(out) as tmp:
        setup = (str(tmp), seed, config, expert, task)
        if workers == 1 or len(blocks) == 1:
            recorder = _Recorder(*setup)
            try:
                parts = [recorder.block(lo, hi, on_done) for lo, hi in blocks]
            finally:
                recorder.close()
        else:
            parts = _record_in_workers(setup, blocks, workers, on_done)
        records = [r for part in parts for r in part.records]
        all_actions = [a for part in parts for a in part.actions]
        successes = {t: [sum(part.successes[t][k] for part in parts) for k in (0, 1)] for t in TEMPLATES}
        if not all_actions:
            raise DemoDatasetError(f"the expert succeeded in none of {episodes} episodes; nothing to write to {out}")
        intr, camera_pose = parts[0].intrinsics, parts[0].camera_pose
        return _finish(tmp, out, {"seed": seed, "episodes_attempted": episodes, "episodes": records,
                                  "successes": successes},
                       [part.shard for part in parts if part.shard is not None], config, expert, intr, camera_pose,
                       all_actions, start_s)


def _record_in_workers(setup: tuple, blocks: list[tuple[int, int]], workers: int,
                       progress: Callable[[int], None] | None) -> list[_Part]:
    """The blocks recorded by `workers` simulator processes, in shard order; progress (episodes done) as each shard
    lands. A worker's failure, or Ctrl-C, is raised at once, and the other workers stop at their next episode."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: each worker imports mujoco afresh and opens its own offscreen context (a forked GL context is not
    # safe to share).
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    with ProcessPoolExecutor(min(workers, len(blocks)), mp_context=context, initializer=_start_worker,
                             initargs=(stop, *setup)) as pool:
        try:
            with _sigint_blocked():     # the workers start (on submit) deaf to Ctrl-C: it is this process's to handle
                futures = [pool.submit(_worker_block, lo, hi) for lo, hi in blocks]
            parts, done, pending = [], 0, set(futures)
            for (lo, hi), future in zip(blocks, futures):
                while not future.done():
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()      # a later block's failure raises now, not after this block is recorded
                parts.append(future.result())
                done += hi - lo
                if progress is not None:
                    progress(done)
        except BaseException:
            # A worker failed (or Ctrl-C): the others end their blocks at the next episode instead of recording
            # them for nothing, and are gone before the caller removes the partial set.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return parts


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile. Processes spawned meanwhile keep it blocked (a signal mask survives
    exec), so Ctrl-C reaches only this process, which stops them; here it is delivered once unblocked, not lost.
    Outside the main thread, where Python never handles signals, nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class _Part:
    """One shard's worth of episodes, recorded: what the manifest needs of them."""
    records: list[dict[str, Any]]
    actions: list[np.ndarray]
    successes: dict[str, list[int]]
    shard: dict[str, Any] | None        # None: no episode of the block succeeded, no file written
    intrinsics: Any
    camera_pose: tuple[np.ndarray, np.ndarray]


class _Recorder:
    """A simulator, a renderer and the runtime's action mapper, recording expert episodes block by block."""

    def __init__(self, out: str, seed: int, config: DemoConfig, expert: ExpertConfig, task: TaskConfig | None):
        from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
        from edgeact.drivers.sim.mujoco_robot import MujocoWorld

        self.out, self.seed, self.config, self.expert, self.task = Path(out), seed, config, expert, task
        self.mapper = runtime_action_mapper()[0]
        self.world = MujocoWorld()
        self.renderer = MujocoRgbdRenderer(self.world, CAMERA, config.width, config.height)
        # The camera rides on the base, which the arm's pushes move a little (up to ~2.5 mm and 0.5 deg within an
        # episode): each frame's labels are projected with the pose it was rendered from; this one (the start
        # pose of every episode) goes into the set's metadata.
        self.camera_pose = self.world.site_pose(OPTICAL_SITE)

    def block(self, lo: int, hi: int, progress: Callable[[int], None] | None = None,
              stopped: Callable[[], bool] = lambda: False) -> _Part:
        """Episodes lo..hi-1; their successes written as shard lo // episodes_per_shard. Raises _Stopped at the
        next episode once `stopped()` says so."""
        config, renderer = self.config, self.renderer
        successes = {t: [0, 0] for t in TEMPLATES}
        records, actions, shard = [], [], _Shard()
        for i in range(lo, hi):
            scene = sample_episode(self.seed + i, list(TEMPLATES)[i % len(TEMPLATES)], self.task)
            for sibling, episode in enumerate([scene] + sibling_episodes(scene, config.siblings, self.task)):
                if stopped():
                    raise _Stopped(f"episodes {lo}..{hi - 1} stopped at {i}")
                frames: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}

                def grab(k: int, at: Any) -> None:
                    if (k == 0) if config.first_chunk_only else (k % config.stride_actions == 0):
                        rgb, depth = renderer.render()[:2]
                        pose = at.site_pose(OPTICAL_SITE)       # where this frame was rendered from
                        frames[k] = rgb, depth, block_pixels(at, depth, pose, renderer.intrinsics), pose

                rollout = run_expert(self.world, episode, self.mapper, self.expert, on_action=grab,
                                     task_config=self.task)
                successes[episode.template][1] += 1
                if rollout.outcome.success:
                    successes[episode.template][0] += 1
                elif not config.first_chunk_only:       # a first chunk's episode is never finished: kept
                    continue
                for k, (rgb, depth, blocks, pose) in sorted(frames.items()):
                    if k < rollout.n_actions:
                        trace = future_trace(rollout.ee_positions_m, k, config.trace_horizon_actions, pose,
                                             renderer.intrinsics)
                        shard.add(rgb, depth, episode.instruction, trace, rollout.chunk(k), i, k, blocks)
                actions.append(rollout.actions)
                records.append({"index": i, "sibling": sibling, **episode.to_dict(), "n_actions": rollout.n_actions})
            if progress is not None:
                progress(i + 1)
        written = shard.write(_shard_path(self.out, lo, config.episodes_per_shard)) if shard.n else None
        return _Part(records, actions, successes, written, renderer.intrinsics, self.camera_pose)

    def close(self) -> None:
        self.renderer.close()


class _Stopped(Exception):
    """A worker's block given up because the recording failed elsewhere or was interrupted (that error is raised)."""


_WORKER: _Recorder | None = None      # a recording worker process's own recorder (record_demos, workers > 1)
_STOP: Any = None                     # ... and the event record_demos sets to stop it


def _start_worker(stop: Any, *setup) -> None:
    global _WORKER, _STOP
    _WORKER, _STOP = _Recorder(*setup), stop


def _worker_block(lo: int, hi: int) -> _Part:
    assert _WORKER is not None, "_start_worker runs first in every worker"
    return _WORKER.block(lo, hi, stopped=_STOP.is_set)


def _new_set(out_dir: str | Path, episodes: int) -> Path:
    from edgeact.runtime.atomic_dir import occupied

    if episodes < 1:
        raise ConfigError(f"episodes: record at least 1, got {episodes}")
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise ConfigError(f"{out} already holds {_held_by(out / MANIFEST)}; give another --out or delete it")
    if occupied(out):       # publishing would replace it: never take what another run or the user put there
        raise ConfigError(f"{out} already exists and holds no finished demonstration set (no {MANIFEST}: an "
                          "interrupted recording of an older edgeact, or other files); delete it or record into "
                          "another directory")
    return out


def _held_by(manifest_path: Path) -> str:
    """What the directory of `manifest_path` is: a demonstration set, or what else writes a manifest.json."""
    from edgeact.runtime.bundle_manifest import OTHER_MANIFESTS, manifest_kind

    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, ValueError):       # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"a {MANIFEST} that is not valid JSON"
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return "a demonstration set"
    kind = manifest_kind(data)
    if kind is None:
        return "a bundle (edgeact export)"
    return kind if kind in OTHER_MANIFESTS.values() else f"a {MANIFEST} of another kind ({kind})"


@contextmanager
def _recording_aside(out: Path) -> Iterator[Path]:
    """A hidden sibling of `out` to record into, renamed into place by `_finish` (runtime/atomic_dir.py). A failed or
    interrupted recording removes it: `out` only ever holds a finished set."""
    from edgeact.runtime.atomic_dir import partial_dir

    tmp = partial_dir(out)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # gone already once published


def _finish(tmp: Path, out: Path, head: dict[str, Any], shards: list[dict[str, Any]], config: DemoConfig,
            expert: ExpertConfig, intr: Any, camera_pose: tuple[np.ndarray, np.ndarray],
            all_actions: list[np.ndarray], start_s: float) -> DemoSummary:
    """Write the manifest into `tmp`, last, and rename the finished set into place at `out`."""
    from edgeact.runtime.atomic_dir import fsync_tree, publish_new

    manifest = {
        "format": FORMAT, **head, "samples": sum(s["samples"] for s in shards), "shards": shards,
        "image": {"width": config.width, "height": config.height, "camera": CAMERA,
                  "intrinsics": {"fx": intr.fx, "fy": intr.fy, "cx": intr.cx, "cy": intr.cy},
                  "camera_optical_pose_base": {"position_m": camera_pose[0].tolist(),
                                               "rotation": camera_pose[1].tolist()}},
        "actions": {"chunk_size": expert.chunk_size, "action_rate_hz": expert.action_rate_hz,
                    "units": "ik mapper, frame base: m, rad, gripper in [-1, 1]"},
        "demo_config": asdict(config), "expert_config": asdict(expert),
        "norm_stats": {NORM_KEY: {"action": action_statistics(np.concatenate(all_actions))}},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in tmp.iterdir())
    fsync_tree(tmp)
    try:
        publish_new(tmp, out)
    except FileExistsError:     # another run or the user put something at --out meanwhile: theirs stays as it is
        kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.recorded-", dir=out.parent))
        os.rename(tmp, kept / out.name)
        raise DemoDatasetError(f"{out} was filled by someone else while this recording ran; nothing there was "
                               f"touched. The finished set is at {kept / out.name}: move it where you want it") from None
    return DemoSummary(out, len(head["episodes"]), head["successes"], manifest["samples"],
                       time.perf_counter() - start_s, size)


# A waypoint counts as passed within this distance when labelling a policy's states: near the expert's own 3 mm,
# so the labels still finish each approach, but not so near that a state beside a waypoint is sent back to it.
LABEL_REACHED_M = 0.01


def record_policy_demos(out_dir: str | Path, policy: Any, episodes: int, seed: int,
                        config: DemoConfig = DemoConfig(), expert: ExpertConfig | None = None,
                        task: TaskConfig | None = None, replan_every: int = 2, expert_mix: float = 0.0,
                        reached_m: float = LABEL_REACHED_M, source: str = "",
                        progress: Callable[[int, int], None] | None = None) -> DemoSummary:
    """DAgger's data (Ross et al. 2011): a learned policy drives the arm, and every state it visits is labelled
    with what the expert would do from there.

    `policy.infer(rgb, instruction, depth_m=...)` plans every `replan_every` actions and its first actions are
    executed, as `edgeact eval --timing lockstep --ensemble off` does: each plan's own actions, not averaged
    with earlier plans' (with probability `expert_mix` per plan the expert's chunk is executed instead). Every `config.stride_actions` actions a sample is written in the demos' format:
    the frame, and as its answer the expert's plan continued from the commanded pose (`ExpertSteering.chunk`,
    a waypoint passed within `reached_m`): its 8 actions and the trace of the positions they pass. Episodes end
    at success or at the time limit, and all are kept: the states a policy gets wrong are the point. The
    manifest's successes are the policy's.
    """
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
    from edgeact.drivers.sim.expert import ActionExecutor, ExpertSteering
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import SuccessJudge, evaluate, reset_world

    if not (1 <= replan_every <= 64 and 0.0 <= expert_mix <= 1.0 and reached_m > 0):
        raise ConfigError(f"replan_every in [1, 64], expert_mix in [0, 1] and reached_m > 0; got {replan_every}, "
                          f"{expert_mix}, {reached_m}")
    if config.first_chunk_only:
        raise ConfigError("first_chunk_only records the expert's own first chunks; a policy's episodes are recorded "
                          "whole: record_demos for first chunks")
    out = _new_set(out_dir, episodes)
    mapper, rates = runtime_action_mapper()
    expert = expert or ExpertConfig(**rates)
    world = MujocoWorld()
    renderer = MujocoRgbdRenderer(world, CAMERA, config.width, config.height)
    camera_pose = world.site_pose(OPTICAL_SITE)
    start_s = time.perf_counter()
    successes = {t: [0, 0] for t in TEMPLATES}
    with _recording_aside(out) as tmp:
        records, all_actions, shards = [], [], _Shards(tmp, config.episodes_per_shard)
        try:
            for i in range(episodes):
                episode = sample_episode(seed + i, list(TEMPLATES)[i % len(TEMPLATES)], task)
                reset_world(world, episode)
                executor = ActionExecutor(world, mapper, expert)
                steering = ExpertSteering(episode, expert, task, reached_m=reached_m)
                mix_rng = np.random.default_rng([episode.seed, 0xDA66])
                limit = min(expert.max_actions, int(round(episode.time_limit_s * expert.action_rate_hz)))
                done, queued, success = 0, [], False
                judge = SuccessJudge.for_episode(episode, task)
                while done < limit and not success:
                    # A plan when the last one's actions are spent: replan_every of them, or all it had if fewer
                    # (as edgeact eval executes them).
                    record, plan = done % config.stride_actions == 0, not queued
                    if record or plan:
                        rgb, depth = renderer.render()[:2]
                        positions, labels = steering.chunk(mapper, executor.commanded_rad, expert.chunk_size)
                    if record:
                        pose = world.site_pose(OPTICAL_SITE)    # the base moves a little: this frame's pose
                        trace = commanded_trace(world, positions, config.trace_horizon_actions, pose,
                                                renderer.intrinsics)
                        shards.add(rgb, depth, episode.instruction, trace, labels, i, done,
                                    block_pixels(world, depth, pose, renderer.intrinsics))
                        all_actions.append(labels[:1])
                    if plan:
                        by_expert = expert_mix > 0 and mix_rng.random() < expert_mix
                        chosen = labels if by_expert else \
                            policy.infer(rgb, episode.instruction, depth_m=depth).actions
                        queued = [np.asarray(a, dtype=np.float64) for a in chosen[:replan_every]]
                    executor.execute(queued.pop(0))
                    steering.observe(executor.commanded_pose().position_m)
                    done += 1
                    holds = evaluate(world, episode, task).success
                    success = judge.update(done / expert.action_rate_hz, holds) is not None
                successes[episode.template][1] += 1
                successes[episode.template][0] += int(success)
                records.append({"index": i, "sibling": 0, **episode.to_dict(), "n_actions": done, "success": success})
                shards.episode_done(i, episodes)
                if progress is not None:
                    progress(i + 1, episodes)
        finally:
            renderer.close()
        head = {"seed": seed, "episodes_attempted": episodes, "episodes": records, "successes": successes,
                "labels": {"policy": source, "replan_every": replan_every, "expert_mix": expert_mix,
                           "reached_m": reached_m}}
        return _finish(tmp, out, head, shards.written, config, expert, renderer.intrinsics, camera_pose, all_actions,
                       start_s)


class _Shards:
    """A set's shards: samples gathered in memory and written as one compressed npz every `per_shard` episodes."""

    def __init__(self, out: Path, per_shard: int):
        self.out, self.per_shard, self.written, self.pending = out, per_shard, [], _Shard()

    def add(self, *sample) -> None:
        self.pending.add(*sample)

    def episode_done(self, i: int, episodes: int) -> None:
        """Episode i of `episodes` is recorded: write the shard when it is full or the set complete."""
        if self.pending.n and ((i + 1) % self.per_shard == 0 or i + 1 == episodes):
            self.written.append(self.pending.write(_shard_path(self.out, i, self.per_shard)))
            self.pending = _Shard()


def _shard_path(out: Path, episode: int, per_shard: int) -> Path:
    """The shard file of the block of `per_shard` consecutive episodes that holds `episode`."""
    return out / f"shard_{episode // per_shard:04d}.npz"


class _Shard:
    """Samples gathered in memory until they are written as one compressed npz."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in ARRAYS}
        self.n = 0

    def add(self, rgb, depth_m, instruction, trace, actions, episode, step, blocks) -> None:
        padded = np.full((MAX_TRACE_POINTS, 2), -1, dtype=np.int64)
        padded[:len(trace)] = trace
        for name, value in zip(ARRAYS, (rgb, depth_m, instruction, padded, len(trace),
                                        actions.astype(np.float32), episode, step, blocks)):
            self.columns[name].append(value)
        self.n += 1

    def write(self, path: Path) -> dict[str, Any]:
        np.savez_compressed(path, **{name: np.asarray(values) for name, values in self.columns.items()})
        return {"file": path.name, "samples": self.n}


@dataclass(frozen=True)
class DemoDataset:
    path: Path
    manifest: dict[str, Any]

    @property
    def norm_stats(self) -> dict[str, Any]:
        return self.manifest["norm_stats"]

    def shards(self) -> Iterator[dict[str, np.ndarray]]:
        """Each shard's arrays (see the module docstring), in order."""
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {name: data[name] for name in ARRAYS}
            except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as exc:
                raise DemoDatasetError(f"{path}: truncated or corrupt shard ({type(exc).__name__}: {exc}); copy the "
                                       "whole directory again, or record the set again") from None
            if len(arrays["rgb"]) != shard["samples"]:
                raise DemoDatasetError(f"{path} holds {len(arrays['rgb'])} samples, the manifest "
                                       f"says {shard['samples']}; the set is damaged: record it again")
            yield arrays

    def arrays(self) -> dict[str, np.ndarray]:
        """All shards concatenated."""
        parts = list(self.shards())
        return {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}

    def scene_seeds(self, episodes: np.ndarray) -> np.ndarray:
        """The scene seed (manifest `episodes[].seed`) of each of these episode numbers of this set's samples."""
        seed_of = {int(e["index"]): int(e["seed"]) for e in self.manifest["episodes"]}
        unknown = sorted({int(e) for e in np.asarray(episodes).tolist()} - seed_of.keys())
        if unknown:
            raise DemoDatasetError(f"{self.path / MANIFEST}: samples of episode {unknown[0]} but no such episode in "
                                   "its 'episodes'; the set is damaged: record it again with `edgeact sim-demos`")
        return np.array([seed_of[int(e)] for e in np.asarray(episodes).tolist()], dtype=np.int64)


def joined_arrays(sets: list[DemoDataset]) -> dict[str, np.ndarray]:
    """Several sets' samples as one (e.g. the expert's and a policy's, for DAgger). Episode numbers are shifted
    so each set's stay apart (a held-out split keeps whole episodes); the images must be of one size."""
    return joined_sets(sets)[0]


def joined_sets(sets: list[DemoDataset]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`joined_arrays`, and each sample's scene seed (its episode's `seed` in its set's manifest): sets recorded
    from overlapping seeds (sim-demos, --first-chunk and --policy all default to --seed 0) show the same scenes
    under other episode numbers, which only the seeds tell."""
    sizes = {(d.manifest["image"]["width"], d.manifest["image"]["height"]) for d in sets}
    if len(sizes) > 1:
        raise DemoDatasetError(f"demonstration sets {[str(d.path) for d in sets]} have images of different sizes "
                               f"{sorted(sizes)}; record them at one --width and --height")
    parts, seeds, offset = [], [], 0
    for demos in sets:
        arrays = demos.arrays()
        seeds.append(demos.scene_seeds(arrays["episode"]))
        arrays["episode"] = arrays["episode"] + offset
        offset = int(arrays["episode"].max()) + 1 if len(arrays["episode"]) else offset
        parts.append(arrays)
    return {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}, np.concatenate(seeds)


def load_demos(path: str | Path) -> DemoDataset:
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        from edgeact.runtime.atomic_dir import occupied
        from edgeact.runtime.bundle import PARTIAL_INFIX

        fix = "delete it and record it again" if occupied(root) else "record one"
        killed = ", ".join(sorted(p.name for p in root.parent.glob(f".{root.name}{PARTIAL_INFIX}*")))
        leftover = (f"; {killed} beside it: left by a recording that was killed, remove it (rm -r) once no "
                    f"sim-demos into {root.name} is running") if killed else ""
        raise DemoDatasetError(f"{root} has no {MANIFEST}: not a finished demonstration set ({fix} with `edgeact "
                               f"sim-demos --out DIR`){leftover}")
    from edgeact.runtime.json_files import read_json_object

    manifest = read_json_object(manifest_path, DemoDatasetError, "a demonstration set's manifest",
                                "the set is damaged: record it again with `edgeact sim-demos`")
    if manifest.get("format") != FORMAT:
        raise DemoDatasetError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}; "
                               "record the set again with `edgeact sim-demos` (or train-reference --generate-demos)")
    _check_manifest(manifest_path, manifest)
    missing = [s["file"] for s in manifest["shards"] if not (root / s["file"]).is_file()]
    if missing:
        raise DemoDatasetError(f"{root}: shards {missing} are missing; copy the whole directory")
    return DemoDataset(root, manifest)


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """What a reader takes from a set's manifest is there and of its type, and the set holds samples: a damaged or
    empty manifest is named (DemoDatasetError) instead of failing later as a KeyError or in np.concatenate."""
    fix = "the set is damaged: record it again with `edgeact sim-demos`"

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and
                                               is_int(s.get("samples")) and s["samples"] >= 1 for s in shards):
        raise DemoDatasetError(f"{path}: 'shards' is {_shown(shards)}, not a list of {{file, samples >= 1}}; {fix}")
    if not shards:
        raise DemoDatasetError(f"{path}: no shards, the set holds no samples; record it again with `edgeact "
                               "sim-demos` (more episodes, if the expert succeeded in none)")
    samples = manifest.get("samples")
    if not is_int(samples) or samples != sum(s["samples"] for s in shards):
        raise DemoDatasetError(f"{path}: 'samples' is {_shown(samples)}, not the {sum(s['samples'] for s in shards)} "
                               f"its shards hold; {fix}")
    image = manifest.get("image")
    if not (isinstance(image, dict) and is_int(image.get("width")) and is_int(image.get("height"))):
        raise DemoDatasetError(f"{path}: 'image' is {_shown(image)}, not the frames' {{width, height, ...}}; {fix}")
    norm_stats = manifest.get("norm_stats")
    if not (isinstance(norm_stats, dict) and isinstance(norm_stats.get(NORM_KEY), dict)):
        raise DemoDatasetError(f"{path}: no norm_stats[{NORM_KEY!r}] (the actions' statistics, got "
                               f"{_shown(norm_stats)}); {fix}")
    episodes = manifest.get("episodes")
    if not isinstance(episodes, list) or not all(isinstance(e, dict) and is_int(e.get("index")) and
                                                 is_int(e.get("seed")) for e in episodes):
        raise DemoDatasetError(f"{path}: 'episodes' is {_shown(episodes)}, not a list of {{index, seed, ...}}; {fix}")


def _shown(value: Any) -> str:
    """A manifest entry as an error message shows it: missing, or its JSON, cut short."""
    if value is None:
        return "missing"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
