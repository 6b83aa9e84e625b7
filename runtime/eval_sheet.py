"""One episode of `edgeact eval` as a PNG sheet: the camera frame with the predicted trace, the action chunk, loop timing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeact.runtime.telemetry import png_figure, save_png

ACTION_LABELS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")


def episode_sheet(path: str | Path, result: Any, frame_rgb: np.ndarray, plan: Any,
                  period_ms: np.ndarray, step_ms: np.ndarray) -> Path:
    """Write the sheet of an EpisodeResult; `plan` has trace_px (k, 2) pixels or None and actions (n, 7).

    period_ms: the control ticks' periods (empty in lockstep: no loop ran); step_ms: the policy steps' wall times.
    """
    path = Path(path)
    fig = png_figure(path, (13, 4.2), "the episode sheet", "or pass --sheets 0: the JSON has every number")
    image_ax, action_ax, timing_ax = fig.subplots(1, 3, width_ratios=(1.1, 1, 1))
    verdict = "success" if result.success else f"failure ({result.failure})" if result.failure else "failure"
    fig.suptitle(f"{result.system}: \"{result.instruction}\" (seed {result.seed}) -> {verdict} "
                 f"in {result.episode_s:.1f} s of {result.time_limit_s:.0f} s")

    image_ax.imshow(frame_rgb)
    trace = getattr(plan, "trace_px", None)
    if trace is not None and len(trace):
        trace = np.asarray(trace, dtype=float)
        image_ax.plot(trace[:, 0], trace[:, 1], "-o", color="yellow", ms=3, lw=1.5, label="predicted trace")
        image_ax.plot(trace[-1:, 0], trace[-1:, 1], "x", color="red", ms=8, mew=2)
        image_ax.legend(loc="lower right", fontsize=7)
    image_ax.set(title="camera at the first plan", xticks=[], yticks=[])

    actions = np.asarray(plan.actions, dtype=float)
    steps = np.arange(len(actions))
    for d, label in enumerate(ACTION_LABELS[:3]):
        action_ax.plot(steps, actions[:, d] * 1e3, "-o", ms=3, label=f"{label} (mm)")
    for d, label in enumerate(ACTION_LABELS[3:6], start=3):
        action_ax.plot(steps, np.degrees(actions[:, d]), "--", lw=1, label=f"{label} (deg)")
    action_ax.axhline(0, color="black", lw=0.5)
    action_ax.set(xlabel="action in the chunk", title="first plan's action chunk")
    action_ax.legend(fontsize=7, ncol=2)

    series = {name: values for name, values in (("control period", period_ms[1:]), ("policy step", step_ms))
              if values.size}
    if series:
        timing_ax.boxplot(list(series.values()), tick_labels=list(series))
        timing_ax.set_yscale("log")
    rates = [f"policy {result.policy_hz:.1f} plans/s" if result.policy_hz else "",
             f"control {result.control_hz:.1f} Hz" if result.control_hz else "lockstep: no control loop"]
    timing_ax.set(ylabel="ms", title=", ".join(r for r in rates if r))
    return save_png(fig, path, 90)
