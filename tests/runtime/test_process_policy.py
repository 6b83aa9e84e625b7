"""ProcessPolicy: the same plans as in-process, frames through shared memory, the child's errors and death made loud.

Each test spawns a real child process (about half a second each on a quiet machine).
"""
import os
import re
import signal

import numpy as np
import pytest

from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime.bundle_policy import BundlePolicyConfig
from edgeact.runtime.errors import ConfigError, GrammarError
from edgeact.runtime.loop import run_robot
from edgeact.runtime.policy import Observation, PolicyContext, ScriptedPolicy, ScriptedPolicyConfig
from edgeact.runtime.process_policy import (ChildTraceback, PolicyProcessError, ProcessPolicy, policy_threads,
                                            with_thread_default)
from edgeact.runtime.robot_config import robot_config_from_dict
from edgeact.runtime.sim_robot import sim_robot_config_dict
from tests.runtime.process_helpers import FailingConfig, FrameEchoConfig, SteerEchoConfig
from tests.runtime.test_loop import IDS, Collect, config_data, torque

pytestmark = pytest.mark.timeout(60)
CONTEXT = PolicyContext(action_rate_hz=10.0)


def observation(t, height=96, width=128, depth=True, fill=0):
    rgb = (np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3) + fill) % 251
    depth_m = np.full((height, width), 0.5 + fill, np.float32) if depth else None
    return Observation(rgb=rgb.astype(np.uint8), depth_m=depth_m, timestamp_s=t, proprio={"a": 0.25, "b": 0.5},
                       instruction="pick", frame_number=int(t))


@pytest.fixture
def sim():
    with SimServoBus("feetech", ids=IDS) as bus:
        yield bus


def test_plans_are_those_of_the_policy_in_process():
    config = ScriptedPolicyConfig(chunk_size=8, latency_s=0.0)
    local = ScriptedPolicy(config, 10.0)
    remote = ProcessPolicy(config, CONTEXT)
    try:
        for t in (100.0, 100.35, 101.2):
            got, want = remote.step(observation(t)), local.step(observation(t))
            np.testing.assert_array_equal(got.actions, want.actions)
            np.testing.assert_array_equal(got.actions_normalized, want.actions_normalized)
            assert got.observation_time_s == t and got.latency_s >= 0
        own_nice = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, remote.pid) == min(own_nice + 10, 19)   # it gives way to control
    finally:
        remote.close()
    assert not remote.alive


def test_the_child_sees_each_frame_whole_also_when_its_size_changes():
    remote = ProcessPolicy(FrameEchoConfig(threads=3), CONTEXT)
    try:
        for obs in (observation(1.0), observation(2.0, fill=3), observation(3.0, 48, 64, depth=False),
                    observation(4.0, 48, 64, fill=1)):
            plan = remote.step(obs)
            depth = -1.0 if obs.depth_m is None else obs.depth_m.astype(np.float64).sum()
            assert list(plan.actions[0]) == [obs.rgb.shape[0], obs.rgb.shape[1], obs.rgb.astype(np.int64).sum(),
                                             depth, 0.75, len("pick"), 3.0]
            assert (plan.decode_steps, plan.choices) == (obs.frame_number, 2 * obs.frame_number + 1)  # as they left
    finally:
        remote.close()


def test_an_error_in_the_step_is_raised_here_with_its_type_message_and_traceback():
    remote = ProcessPolicy(FailingConfig(fail_at=1), CONTEXT)
    try:
        remote.step(observation(1.0))
        with pytest.raises(RuntimeError, match="^the model fell over$") as info:
            remote.step(observation(2.0))
        assert isinstance(info.value.__cause__, ChildTraceback)
        assert "Traceback" in str(info.value.__cause__) and "process_helpers.py" in str(info.value.__cause__)
        assert remote.step(observation(3.0)).actions.shape == (2, 7)     # the child lives on after its error
    finally:
        remote.close()


def test_steering_reaches_the_policy_in_the_child_and_its_refusal_is_raised_here():
    remote = ProcessPolicy(SteerEchoConfig(), CONTEXT)
    try:
        remote.steer([[10, 20], [30, 40]])
        assert remote.step(observation(1.0)).trace_px.tolist() == [[10, 20], [30, 40]]
        with pytest.raises(GrammarError, match=r"^steer\(\) needs 1\.\.5 points \[x, y\].*got \(1, 3\)") as info:
            remote.steer([[10, 20, 30]])
        assert isinstance(info.value.__cause__, ChildTraceback)
        assert remote.step(observation(2.0)).trace_px.tolist() == [[10, 20], [30, 40]]     # kept; the child lives on
        remote.steer(None)
        assert remote.step(observation(3.0)).trace_px is None
    finally:
        remote.close()


def test_steering_a_policy_that_cannot_be_steered_says_so():
    remote = ProcessPolicy(ScriptedPolicyConfig(latency_s=0.0), CONTEXT)
    try:
        with pytest.raises(ConfigError, match=r"^policy type 'scripted' \(ScriptedPolicy\) cannot be steered"):
            remote.steer([[1, 1]])
        assert remote.step(observation(1.0)).actions.shape == (8, 7)
    finally:
        remote.close()


def test_an_error_that_does_not_pickle_still_comes_back_named():
    remote = ProcessPolicy(FailingConfig(mode="unpicklable", fail_at=0), CONTEXT)
    try:
        with pytest.raises(PolicyProcessError, match=r"UnpicklableError: the model fell over \(code 7\)"):
            remote.step(observation(1.0))
    finally:
        remote.close()


def test_a_load_error_is_raised_by_the_constructor_and_the_child_is_gone():
    with pytest.raises(ConfigError, match="^path: no bundle here$"):
        ProcessPolicy(FailingConfig(mode="load", message="no bundle here"), CONTEXT)


@pytest.mark.parametrize("mode, words", [("load-exit", "loading the policy raised SystemExit (4)"),
                                         ("load-interrupt", "loading the policy raised KeyboardInterrupt")])
def test_an_exit_or_interrupt_while_the_child_loads_is_its_failure_not_ours(mode, words):
    """Raised here as they were, they would end `edgeact run` silently with the child's code, or as if the operator
    had pressed Ctrl-C."""
    with pytest.raises(PolicyProcessError, match=re.escape(f"{words}; the robot was not started")):
        ProcessPolicy(FailingConfig(mode=mode), CONTEXT)


def test_a_child_killed_by_a_signal_without_a_name_is_named_by_its_number():
    remote = ProcessPolicy(ScriptedPolicyConfig(latency_s=0.0), CONTEXT)
    try:
        os.kill(remote.pid, signal.SIGRTMIN + 2)        # real-time signals have no name in signal.Signals
        with pytest.raises(PolicyProcessError, match=rf"killed by signal {int(signal.SIGRTMIN) + 2}\).*safe state"):
            remote.step(observation(1.0))
    finally:
        remote.close()


def test_a_crash_in_native_code_prints_the_childs_python_stack(capfd):
    remote = ProcessPolicy(FailingConfig(mode="segv", fail_at=0), CONTEXT)
    try:
        with pytest.raises(PolicyProcessError, match=r"killed by signal SIGSEGV\).*Look above for the child's own "
                                                     r"error output \(a crash in native code prints its Python stack"):
            remote.step(observation(1.0))
    finally:
        remote.close()
    err = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in err and "process_helpers.py" in err and "in step" in err


@pytest.mark.parametrize("interrupt", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "systemd's stop"])
def test_a_ctrl_c_to_the_process_group_while_the_child_starts_is_ignored_by_it(capfd, interrupt):
    """SIGINT reaches every process of the terminal's group, and systemd stops a service with SIGTERM to its whole
    group; a child still importing (before its main ignores them) would die with a traceback, or at once. It starts
    with both blocked, then ignores them: its parent stops it once the robot is safe."""
    import time

    from edgeact.runtime.process_policy import ChildProcess, _child_main

    # Sent to the child alone (the terminal's Ctrl-C reaches this process too, which handles it itself).
    child = ChildProcess(_child_main, (FailingConfig(mode="load-wait"), CONTEXT, 0), "edgeact-policy-test")
    try:
        for _ in range(20):                         # through the child's imports, its unpickling and its loading
            os.kill(child.pid, interrupt)
            time.sleep(0.05)
        message = child.receive(10.0)
        assert message is not None and message[0] == "ready", child.exit_status()
        os.kill(child.pid, interrupt)                   # once it serves, too
        time.sleep(0.1)
        assert child.alive, child.exit_status()
    finally:
        child.stop()
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def test_a_killed_child_makes_the_step_fail_loudly_and_for_good():
    remote = ProcessPolicy(ScriptedPolicyConfig(latency_s=0.0), CONTEXT)
    try:
        remote.step(observation(1.0))
        os.kill(remote.pid, signal.SIGKILL)
        killed = r"exited (before|during) a step \(killed by signal SIGKILL\).*safe state"
        with pytest.raises(PolicyProcessError, match=killed):
            remote.step(observation(2.0))
        with pytest.raises(PolicyProcessError, match="is unusable"):
            remote.step(observation(3.0))
    finally:
        remote.close()


def test_a_hung_child_is_stopped_after_the_step_timeout():
    remote = ProcessPolicy(FailingConfig(mode="hang", fail_at=0), CONTEXT, step_timeout_s=0.5)
    try:
        with pytest.raises(PolicyProcessError, match=r"did not answer within 0.5 s during a step; it was stopped"):
            remote.step(observation(1.0))
        assert not remote.alive
    finally:
        remote.close()


def test_fork_is_refused():
    with pytest.raises(ConfigError, match="start method 'fork' unsupported"):
        ProcessPolicy(ScriptedPolicyConfig(), CONTEXT, start_method="fork")


def test_threads_leave_one_core_to_control_unless_set():
    assert [policy_threads(n) for n in (1, 2, 8)] == [1, 1, 7]
    assert with_thread_default(FrameEchoConfig()).threads == policy_threads()
    assert with_thread_default(FrameEchoConfig(threads=4)).threads == 4
    scripted = ScriptedPolicyConfig()
    assert with_thread_default(scripted) is scripted                    # no threads field: nothing to set
    on_gpu = BundlePolicyConfig(path="bundle", backend="tensorrt")      # threads refused there: none filled in
    assert with_thread_default(on_gpu) is on_gpu and on_gpu.in_own_process
    assert with_thread_default(BundlePolicyConfig(path="bundle")).threads == policy_threads()


def test_the_process_option_picks_the_wrapper():
    assert not ScriptedPolicyConfig().in_own_process
    assert type(ScriptedPolicyConfig(process=False).make_robot_policy(CONTEXT)) is ScriptedPolicy
    policy = ScriptedPolicyConfig(process=True, latency_s=0.0).make_robot_policy(CONTEXT)
    try:
        assert isinstance(policy, ProcessPolicy)
    finally:
        policy.close()
    data = sim_robot_config_dict(policy={"type": "scripted", "process": True})

    assert robot_config_from_dict(data).policy.in_own_process
    assert robot_config_from_dict(data).to_dict()["policy"]["process"] is True
    data["policy"]["process"] = "yes"
    with pytest.raises(ConfigError, match="policy.process: must be true or false"):
        robot_config_from_dict(data)


def test_a_policy_process_killed_mid_run_stops_the_loop_with_torque_off(sim):
    config = robot_config_from_dict(config_data(sim))
    policy = ProcessPolicy(ScriptedPolicyConfig(latency_s=0.02), CONTEXT)
    events = Collect(at_tick=30, action=lambda: os.kill(policy.pid, signal.SIGKILL))
    result = run_robot(config, 20.0, [events], policy=policy)
    assert result.reason == "error" and isinstance(result.error, PolicyProcessError)
    assert "loop-planner: PolicyProcessError: policy process (scripted) failed" in result.detail
    assert "killed by signal SIGKILL" in result.detail and result.duration_s < 10
    assert "policy" not in result.peak_rss_bytes and result.peak_rss_bytes["control"] > 0
    assert torque(sim) == [0] * 6


def test_a_policy_error_in_the_child_stops_the_loop_like_one_in_process(sim):
    config = robot_config_from_dict(config_data(sim))
    result = run_robot(config, 20.0, policy=ProcessPolicy(FailingConfig(fail_at=3), CONTEXT))
    assert result.reason == "error" and "loop-planner: RuntimeError: the model fell over" in result.detail
    assert set(result.peak_rss_bytes) == {"control", "policy"}     # the child outlives its step's error
    assert torque(sim) == [0] * 6


def test_an_exit_that_skipped_stop_does_not_wait_forever_for_a_child(tmp_path):
    """Children ignore SIGTERM, which multiprocessing stops daemon children with at exit (then waits): an error on
    the way out that skipped stop() left the interpreter waiting for ever."""
    import subprocess
    import sys
    import time

    script = tmp_path / "exits.py"
    script.write_text(
        "from edgeact.runtime.policy import PolicyContext, ScriptedPolicyConfig\n"
        "from edgeact.runtime.process_policy import ChildProcess, _child_main\n"
        "if __name__ == '__main__':\n"
        "    child = ChildProcess(_child_main, (ScriptedPolicyConfig(), PolicyContext(action_rate_hz=10.0), 0), 'c')\n"
        "    assert child.receive(30.0)[0] == 'ready'\n"
        "    print(child.pid, flush=True)\n"
        "    raise RuntimeError('an error on the way out')\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "an error on the way out" in done.stderr, done.stderr
    assert time.monotonic() - started < 40
    pid = int(done.stdout.split()[0])
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
