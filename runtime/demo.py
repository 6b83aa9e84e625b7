"""The demo and the benchmark: run the loop for a while with timing statistics, write them as JSON and a PNG.

`edgeact demo` is this on the built-in simulated robot (sim_robot.py): a Feetech arm on a pty,
driven through the real serial driver and SafetyGuard, and a synthetic camera. As on a robot, the
model runs in its own process (process_policy.py) and the simulated motors in theirs, so what is
measured is the control process itself.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeact.runtime.device_info import read_device_info
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.loop import RunResult, run_robot
from edgeact.runtime.robot_config import RobotConfig, robot_config_from_dict
from edgeact.runtime.sim_robot import sim_robot_config_dict
from edgeact.runtime.recorder import CommandRecorder
from edgeact.runtime.telemetry import (
    LogSubscriber, TimingStats, bundle_identity, distinct_outputs, is_recording, not_another_file, output_file,
    outputs_not_inputs,
)

DEMO_POLICIES = ("scripted", "bundle")
DEMO_ROBOTS = ("simple", "mujoco")
DEMO_EPISODE = (1_000_023, "push_right")   # the MuJoCo demo's episode: an evaluation seed, never a training one


def demo_config_dict(policy: str = "scripted", bundle: str | None = None, robot: str = "simple",
                     episode: tuple[int, str | None] = DEMO_EPISODE) -> dict[str, Any]:
    """The simulated robot's config with the demo's policy: the scripted stand-in, or a bundle.

    robot "simple": the Feetech arm with simple physics and a synthetic camera; "mujoco": the mobile
    manipulator in MuJoCo set to the reference task's `episode` (seed, template), its camera at the
    size the reference ARM was trained on, and the depth forced from the camera when the bundle has
    a depth tokenizer stage.
    """
    if policy not in DEMO_POLICIES:
        raise ConfigError(f"demo policy {policy!r} unknown; use one of {', '.join(DEMO_POLICIES)}")
    if robot not in DEMO_ROBOTS:
        raise ConfigError(f"demo robot {robot!r} unknown; use one of {', '.join(DEMO_ROBOTS)}")
    if policy == "bundle" and not bundle:
        raise ConfigError("the bundle policy needs a bundle directory (--bundle PATH, from `edgeact export`)")
    if policy != "bundle" and bundle:
        raise ConfigError("a bundle was given but the policy is 'scripted'; add --policy bundle to use it")
    if bundle:
        # Absolute: a config written with --write-config elsewhere resolves relative paths against its own folder.
        bundle = str(Path(bundle).resolve())
    if robot == "simple":
        if policy == "bundle":
            return sim_robot_config_dict(policy={"type": "bundle", "path": str(bundle), "process": True})
        return sim_robot_config_dict()
    from edgeact.runtime.sim_eval import EVAL_CAMERA_PX, REFERENCE_ACTION_DECODING, has_depth_stage
    from edgeact.runtime.sim_robot import episode_config_dict, mujoco_robot_config_dict

    sections: dict[str, Any] = {}
    if policy == "bundle":
        sections["policy"] = {"type": "bundle", "path": str(bundle), "process": True,
                              "forced_depth": "sensor" if has_depth_stage(bundle) else None,
                              "action_decoding": REFERENCE_ACTION_DECODING}     # as `edgeact eval` decodes
    base = mujoco_robot_config_dict(**sections)
    base["camera"].update(width=EVAL_CAMERA_PX[0], height=EVAL_CAMERA_PX[1])
    return episode_config_dict(base, *episode)


def demo_config(policy: str = "scripted", bundle: str | None = None, robot: str = "simple",
                episode: tuple[int, str | None] = DEMO_EPISODE) -> RobotConfig:
    return robot_config_from_dict(demo_config_dict(policy, bundle, robot, episode),
                                  source=f"<demo: built-in {robot} simulated robot>")


@dataclass(frozen=True)
class MeasuredRun:
    result: RunResult
    summary: dict[str, Any]
    json_path: Path | None              # None: it could not be written (json_note says why)
    plot_path: Path | None
    plot_note: str = ""                 # why there is no plot
    stats: TimingStats | None = None    # the summary's statistics and the newest samples (plots, the sheet)
    json_note: str = ""                 # why there is no JSON


def measure(config: RobotConfig, seconds: float, out_dir: str | Path, name: str = "bench",
            record: str | Path | None = None, progress: Callable[[float], None] | None = None,
            estop: threading.Event | None = None, subscribers: tuple = ()) -> MeasuredRun:
    """Run the loop for `seconds`, then write OUT_DIR/NAME.json (the summary) and OUT_DIR/NAME.png (an older run's
    NAME.png and NAME-episode.png are removed when NAME.json is marked "incomplete").

    Besides TimingStats' numbers the summary has the run's own: how the control thread was
    scheduled, and each process's peak memory against the budget 1.3 x bundle bytes + 300 MB.
    The policy's bundle and the outputs are checked before anything is written (a bad input leaves an
    older NAME.json as it was), then that NAME.json is replaced by one marked "incomplete" before the run
    starts: found unwritable after it, every number would be lost.
    """
    config = check_policy_bundle(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; give a folder for {name}.json and {name}.png "
                          "(it is made if missing)")
    json_path = output_file(out_dir / f"{name}.json", "--out")
    outputs = {"--out": json_path, f"--out ({name}.png)": out_dir / f"{name}.png"}
    if record:
        outputs["--record"] = output_file(record, "--record")
    distinct_outputs(outputs)
    outputs_not_inputs(outputs, config.input_files)
    if record:      # an older run's recording is replaced; nothing else is (NAME.json in --out is the run's own)
        not_another_file(outputs["--record"], "--record", is_recording, "an edgeact recording")
    stats = TimingStats(config.rates.control_hz)
    stats.start_json(json_path, "--out")
    for older in (f"{name}.png", f"{name}-episode.png"):    # an older run's pictures never sit beside this run's JSON
        (out_dir / older).unlink(missing_ok=True)
    every = [stats, LogSubscriber(), *subscribers] + ([CommandRecorder(record)] if record else [])
    device = read_device_info()         # the power mode and clocks the run starts under
    bundle = policy_bundle(config)
    result = run_robot(config, seconds, every, progress=progress, estop=estop)
    extra = stats.finish(result, bundle, device)
    summary = {**stats.summary(), **extra}
    json_path, json_note = stats.write_final_json(json_path, extra)
    try:
        return MeasuredRun(result, summary, json_path, stats.plot_png(out_dir / f"{name}.png"), stats=stats,
                           json_note=json_note)
    except (EdgeactError, OSError) as exc:     # no matplotlib on this robot, or no room: the JSON has every number
        return MeasuredRun(result, summary, json_path, None, str(exc), stats, json_note=json_note)


def policy_bundle(config: RobotConfig) -> dict[str, Any] | None:
    """Which bundle the config's policy loads (telemetry.bundle_identity), if it has one; read when the run starts,
    from the config check_policy_bundle pinned."""
    path = bundle_path(config)
    return bundle_identity(path) if path is not None and path.is_dir() else None


def check_policy_bundle(config: RobotConfig) -> RobotConfig:
    """Refuse a policy bundle that is not there or not a bundle before any output is touched: the run would
    only find out in the policy's process. Reads the manifest alone; the policy's load checks the files.

    Returns the config with the bundle's path resolved once (a store's `current` link followed: runtime/
    bundle_store.py), so the policy, in its own process, and the run's summary all mean the bundle checked here,
    even if `edgeact flash` switches `current` while the run starts or runs."""
    path = bundle_path(config)
    if path is None:
        return config
    from edgeact.runtime.bundle import read_manifest

    read_manifest(path)
    real = path.resolve()
    if real == path:
        return config
    read_manifest(real)     # the link may have been switched meanwhile: the bundle pinned is checked too
    return dataclasses.replace(config, policy=dataclasses.replace(config.policy, path=str(real)))


def bundle_path(config: RobotConfig) -> Path | None:
    """The bundle policy's `path` (relative to the config); None for other policies (a plugin's path is its own)."""
    if config.policy.type_name != "bundle" or not getattr(config.policy, "path", None):
        return None
    return config.policy.bundle_dir(config.config_dir)
