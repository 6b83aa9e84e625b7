"""`edgeact demo` and `edgeact bench` end to end on the built-in simulated robot; the sample config; the e-stop key."""
import argparse
import io
import json
import os
import re
import termios
import threading
import time

import pytest

from edgeact.runtime import commands_loop, errors, loop_events
from edgeact.runtime.demo import measure
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.loop_events import Subscriber
from edgeact.runtime.robot_config import load_robot_config, robot_config_from_dict
from edgeact.runtime.sim_robot import sim_robot_config_dict

pytestmark = pytest.mark.timeout(60)


def edgeact(*argv: str) -> int:
    """The loop's sub-commands through argparse, as `edgeact` runs them (without the other modules' commands)."""
    parser = argparse.ArgumentParser(prog="edgeact")
    commands_loop.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_demo_runs_end_to_end_and_writes_json_and_png(tmp_path, capsys):
    assert edgeact("demo", "--seconds", "1.5", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    for text in ("control loop (target 100 Hz)", "achieved frequency", "policy steps per second", "frame -> command",
                 f"timing JSON: {tmp_path / 'demo.json'}", "stopped: duration"):
        assert text in out
    assert re.search(r"decoder calls per plan +[│|] +- +[│|]", out)      # the scripted policy decodes nothing
    summary = json.loads((tmp_path / "demo.json").read_text())
    control = summary["control"]
    assert control["target_hz"] == 100.0 and control["ticks"] > 20 and 10 < control["achieved_hz"] <= 105
    assert {"p50", "p99", "max"} <= set(control["period_ms"]) and control["overruns"] >= 0
    assert summary["policy"]["plans"] >= 2 and summary["policy"]["plans_per_s"] > 0
    assert {"capture", "scripted", "policy_total", "state_read", "command_write"} <= set(summary["stages_ms"])
    assert summary["frame_to_command_ms"]["p50"] > 100     # the sample's scripted policy takes 100 ms
    assert summary["stop"] == {"reason": "duration", "detail": "1.5 s elapsed"}
    if _has_matplotlib():
        assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG" and "timing plot: " + str(tmp_path) in out
    else:
        assert "timing plot: not written" in out and "matplotlib" in out


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_write_config_then_bench_it(tmp_path, capsys):
    path = tmp_path / "robot.json"
    assert edgeact("demo", "--write-config", str(path)) == 0
    assert load_robot_config(path).to_dict() == robot_config_from_dict(sim_robot_config_dict()).to_dict()
    record = tmp_path / "commands.jsonl"
    out_dir = tmp_path / "bench"
    assert edgeact("bench", str(path), "--seconds", "1", "--out", str(out_dir), "--record", str(record)) == 0
    assert "achieved frequency" in capsys.readouterr().out
    summary = json.loads((out_dir / "bench.json").read_text())
    assert summary["schema"] == "edgeact.bench/1" and summary["control"]["ticks"] > 10
    assert sum(json.loads(line)["event"] == "command" for line in record.read_text().splitlines()) > 10


def test_demo_bundle_policy_needs_a_bundle_and_a_registered_type(tmp_path):
    with pytest.raises(EdgeactError, match="needs a bundle directory"):
        edgeact("demo", "--policy", "bundle", "--seconds", "1")
    with pytest.raises(EdgeactError, match="add --policy bundle"):
        edgeact("demo", "--bundle", str(tmp_path), "--seconds", "1")
    # Until runtime/bundle_policy.py registers "bundle" this names the known types; after, the missing bundle.
    with pytest.raises(EdgeactError, match="bundle"):
        edgeact("demo", "--policy", "bundle", "--bundle", str(tmp_path / "no-such-bundle"), "--seconds", "1",
                "--out", str(tmp_path))


def test_estop_key_sets_the_event_and_restores_the_terminal():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        event = threading.Event()
        with commands_loop.KeyEstop(" ", event, fd=slave):
            assert not termios.tcgetattr(slave)[3] & termios.ICANON      # keys come without Enter
            os.write(master, b"x")
            time.sleep(0.1)
            assert not event.is_set()
            os.write(master, b" ")
            assert event.wait(5.0)
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_estop_key_without_a_terminal_is_off_and_says_so(caplog, tmp_path):
    event = threading.Event()
    with open(tmp_path / "not-a-tty", "w+") as f, commands_loop.KeyEstop("q", event, fd=f.fileno()) as key:
        assert key._thread is None
    assert "needs a terminal on stdin; it is OFF" in caplog.text


def test_the_mujoco_demo_runs_one_episode_and_reports_the_task(tmp_path, capsys):
    pytest.importorskip("mujoco", reason="the MuJoCo robot needs mujoco (pip install mujoco==4.0.0)")
    # The scripted stand-in does not solve the task: the report says so, with where the block and the hand are.
    assert edgeact("demo", "--robot", "mujoco", "--seed", "3", "--template", "move_to", "--seconds", "2",
                   "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert re.search(r"not done within [12]\.\d s", out)     # the run's 2 s, not the episode's 5 s limit
    for text in ("control loop (target 100 Hz)", 'task: "move to the', "(seed 3)",
                 "end effector to the block's top", "peak RSS (VmHWM)", "simulator (not counted): sim"):
        assert text in out, text
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["control"]["ticks"] > 50 and summary["policy"]["plans"] >= 2
    if _has_matplotlib():
        assert (tmp_path / "demo-episode.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(EdgeactError, match="--robot mujoco"):
        edgeact("demo", "--seed", "3", "--seconds", "1")


def test_the_loop_table_shows_the_decoder_calls_beside_the_choices():
    from rich.console import Console

    from tests.runtime.test_telemetry import _filled_stats

    def row(summary) -> str:
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(commands_loop._summary_tables(summary))
        return re.search(r"decoder calls per plan +[│|] +(.*?) +[│|]", console.export_text()).group(1)

    summary = _filled_stats().summary()
    assert row(summary) == "40.00 for 88.00 choices"         # drafting: fewer calls than choices - 1
    for missing in (0.0, None):     # a policy without a decoder (scripted), or no plan at all
        assert row({**summary, "policy": {**summary["policy"], "choices_mean": missing}}) == "-"


def test_the_task_report_says_when_a_success_was_undone_by_the_end():
    episode = {"instruction": "push the green block to the right", "seed": 1, "time_limit_s": 9.0}
    end = {"target_displacement_m": [-0.027, -0.136, 0.0], "ee_to_target_m": [0.011, 0.022, 0.0],
           "max_other_displacement_m": 0.0, "failure": None}
    task = {"episode": episode, "success": True, "first_success_s": 2.04, "sim_time_s": 9.0, "outcome": end}
    rows = dict(commands_loop.task_rows(task))
    assert rows["result"] == "[green]SUCCESS[/] after 2.0 s"
    assert rows["named block moved (x, y, z), at the end"] == "-2.7 -13.6 +0.0 cm"
    # The loop runs on after the first success: the block pushed on, off the table, is no success at the end.
    fallen = dict(task, success=False, outcome={**end, "target_displacement_m": [-0.18, -0.23, -0.2],
                                                "failure": "block knocked off the table"})
    assert dict(commands_loop.task_rows(fallen))["result"] == \
        "[green]SUCCESS[/] after 2.0 s, [yellow]undone[/] by the end (9.0 s)"
    never = dict(task, success=False, first_success_s=None)
    assert dict(commands_loop.task_rows(never))["result"] == "[red]not done[/] within 9.0 s"


def test_the_mujoco_demo_config_sets_the_episode_and_the_trained_camera(tmp_path):
    pytest.importorskip("mujoco", reason="the MuJoCo robot needs mujoco (pip install mujoco==4.0.0)")
    from edgeact.drivers.sim.task import sample_episode

    path = tmp_path / "robot.json"
    assert edgeact("demo", "--robot", "mujoco", "--seed", "11", "--template", "push_right",
                   "--write-config", str(path)) == 0
    config = load_robot_config(path)
    assert (config.robot.task.seed, config.robot.task.template) == (11, "push_right")
    assert config.instruction == sample_episode(11, "push_right").instruction
    assert (config.camera.width, config.camera.height) == (160, 120) and config.robot.physics == "mujoco"


def test_the_mujoco_demo_decodes_actions_as_the_eval_does(tmp_path_factory):
    pytest.importorskip("mujoco", reason="the MuJoCo robot needs mujoco (pip install mujoco==4.0.0)")
    from edgeact.runtime.demo import demo_config_dict
    from tests.runtime.test_decode_program import exported_bundle

    bundle = exported_bundle(tmp_path_factory, "D").bundle_dir
    policy = demo_config_dict("bundle", str(bundle), robot="mujoco")["policy"]
    assert policy["action_decoding"] == "median" and policy["path"] == str(bundle)


def test_a_written_config_holds_the_bundle_path_absolute(tmp_path, monkeypatch):
    # The config is read from its own folder, where the path given relative to the working directory means nothing.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert edgeact("demo", "--policy", "bundle", "--bundle", "out/b", "--write-config", "configs/robot.json") == 0
    written = json.loads((tmp_path / "configs" / "robot.json").read_text())
    assert written["policy"]["path"] == str(tmp_path / "out" / "b")


def test_estop_key_required_without_a_terminal_refuses_naming_the_fixes(tmp_path):
    event = threading.Event()
    with open(tmp_path / "not-a-tty", "w+") as f:
        with pytest.raises(ConfigError, match=r"the e-stop key 'q' needs a terminal on stdin .* the robot would run "
                                              r"with no e-stop. Run it in a terminal \(over ssh: `ssh -t`\), or set "
                                              r"estop.file in the config"):
            commands_loop.KeyEstop("q", event, fd=f.fileno(), required=True).__enter__()
    real = robot_config_from_dict({**sim_robot_config_dict(), "estop": {"key": "q"}})
    real.robot.bus = "feetech"      # as on a robot: only the flag's inputs matter here
    assert commands_loop.estop_key_required(real)
    real.estop.file = "robot.estop"
    assert not commands_loop.estop_key_required(real)
    assert not commands_loop.estop_key_required(robot_config_from_dict({**sim_robot_config_dict(),
                                                                       "estop": {"key": "q"}}))   # simulated: a warning


def test_bench_refuses_an_out_that_is_a_file_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr("edgeact.runtime.demo.run_robot", lambda *a, **k: pytest.fail("the run started"))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"--out {afile} is a file, not a folder; give a folder for bench.json"):
        edgeact("bench", "--out", str(afile), "--seconds", "1")
    with pytest.raises(ConfigError, match="--out and --record name the same file"):
        edgeact("bench", "--out", str(tmp_path), "--record", str(tmp_path / "bench.json"), "--seconds", "1")


def test_bench_replaces_an_older_json_at_the_start(tmp_path, monkeypatch):
    # A run that dies (here: the simulator does not start) must not leave the older run's numbers looking current.
    (tmp_path / "bench.json").write_text(json.dumps({"control": {"achieved_hz": 99.9}}))

    def fails(*args, **kwargs):
        raise RuntimeError("the simulator did not start")

    monkeypatch.setattr("edgeact.runtime.demo.run_robot", fails)
    with pytest.raises(RuntimeError, match="the simulator did not start"):
        edgeact("bench", "--out", str(tmp_path), "--seconds", "1")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["incomplete"] is True and data["control"]["achieved_hz"] is None


def test_an_older_runs_pictures_go_with_its_json(tmp_path, monkeypatch):
    """Its plot and episode sheet stood beside the new run's placeholder JSON, looking like the new run's."""
    for old in ("bench.png", "bench-episode.png"):
        (tmp_path / old).write_bytes(b"an older run's picture")

    def fails(*args, **kwargs):
        raise RuntimeError("the simulator did not start")

    monkeypatch.setattr("edgeact.runtime.demo.run_robot", fails)
    with pytest.raises(RuntimeError, match="the simulator did not start"):
        edgeact("bench", "--out", str(tmp_path), "--seconds", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_an_interrupt_while_the_report_is_made_waits_for_its_end(tmp_path, monkeypatch, capsys):
    """systemd's stop or a Ctrl-C after the loop ended: the report was cut short (no "motors now", no sheet)."""
    import signal

    tables = commands_loop._summary_tables

    def interrupted_tables(summary):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return tables(summary)

    monkeypatch.setattr(commands_loop, "_summary_tables", interrupted_tables)
    assert edgeact("bench", "--out", str(tmp_path), "--seconds", "1") == errors.EXIT_INTERRUPTED
    out = capsys.readouterr().out
    assert "motors now:" in out and "SIGINT during the report: it was finished first" in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # put back


class SlowPlot(Subscriber):
    """A live plot slower than the control rate: 25 ms per command, at 100 commands per second."""

    def on_command(self, event):
        time.sleep(0.025)


def test_a_subscriber_too_slow_to_catch_up_marks_the_summary_incomplete(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_events, "DRAIN_S", 0.3)
    config = robot_config_from_dict(sim_robot_config_dict(), source="sim")
    record = tmp_path / "record.jsonl"
    run = measure(config, 1.0, tmp_path, "bench", record=record, subscribers=(SlowPlot(),))
    data = json.loads(run.json_path.read_text())
    assert data["incomplete"] is True and data["undelivered_events"] == run.result.undelivered_events > 0
    assert data["control"]["ticks"] + data["undelivered_events"] >= run.result.ticks
    assert data["stop"]["reason"] == "duration"                 # the stop and the trips still reach the statistics
    events = [json.loads(line)["event"] for line in record.read_text().splitlines()]   # and the record, closed after
    assert "stop" in events and events[-1] == "trip"


def test_a_sigterm_in_the_runs_teardown_exits_143(tmp_path, monkeypatch, capsys):
    """systemd's stop lands while a run ends: deferred, then the exit said Ctrl-C's 130."""
    import signal

    from edgeact.runtime import loop

    real = loop.peak_rss_bytes

    def peak_rss_bytes(pid):
        if pid == os.getpid():
            os.kill(os.getpid(), signal.SIGTERM)        # during the teardown, after the loop's own end
        return real(pid)

    monkeypatch.setattr(loop, "peak_rss_bytes", peak_rss_bytes)
    assert edgeact("bench", "--out", str(tmp_path), "--seconds", "1") == errors.EXIT_TERMINATED
    assert "motors now:" in capsys.readouterr().out
