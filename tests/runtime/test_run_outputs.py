"""What a run leaves for afterwards when the storage fails it: a recording whose close failed, a summary that cannot
be written, events dropped on the way to the statistics. The run's end is always told, and so is what was lost."""
import errno
import json
import math
import os

import pytest

from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime import cli, recorder, telemetry
from edgeact.runtime.telemetry import TimingStats
from tests.runtime.test_loop import IDS, config_data

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sim():
    with SimServoBus("feetech", ids=IDS) as bus:
        yield bus


def test_a_recording_whose_close_fails_is_not_a_clean_run(sim, tmp_path, monkeypatch, capsys):
    """The last flush / sync to a failing SD card: the run says the recording may lack its end, and exits non-zero."""
    real = os.fsync
    record = tmp_path / "run.jsonl"

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(record):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(recorder.os, "fsync", failing)
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))
    summary = tmp_path / "run.json"
    assert cli.main(["run", str(path), "--seconds", "1", "--record", str(record), "--json", str(summary)]) == 2
    captured = capsys.readouterr()
    assert "motors now:" in captured.out and "closing an output failed, so it may lack its end" in captured.err
    assert "closing an output failed" in json.loads(summary.read_text())["teardown_error"]


def test_a_summary_that_cannot_be_written_still_ends_the_run_in_words(sim, tmp_path, monkeypatch, capsys):
    real, calls = os.replace, []

    def full(src, dst):
        calls.append(dst)
        if len(calls) > 1:          # the "incomplete" marker at the start went in; the final summary does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(telemetry.os, "replace", full)
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))
    summary = tmp_path / "run.json"
    assert cli.main(["run", str(path), "--seconds", "1", "--json", str(summary)]) == 2
    captured = capsys.readouterr()
    assert "timing summary NOT written" in captured.out and "motors now:" in captured.out
    assert "the timing summary was not written (the run itself ended cleanly)" in captured.err
    assert json.loads(summary.read_text())["incomplete"] is True              # the marker, never a torn file
    assert not list(tmp_path.glob(".run.json.partial"))


def test_dropped_events_do_not_make_the_rate_and_overruns_the_delivered_ones():
    """A stuck subscriber dropped events: the summary takes the loop's own tick and overrun counts."""
    from types import SimpleNamespace

    from edgeact.runtime.loop_events import CommandEvent

    stats = TimingStats(100.0)
    for tick in range(0, 300, 3):           # a third of the ticks delivered, 10 ms apart each
        stats.on_command(CommandEvent(tick * 0.01, tick, 0.01, "follow", {}, {}, {}, None, 0, False, math.nan,
                                      0.0, 0.0, 0.001))
    assert stats.summary()["control"]["achieved_hz"] < 40
    assert stats.plot_title() == "control loop: 100 ticks, 0 overruns"
    stats.exact_counts(SimpleNamespace(undelivered_events=200, ticks=300, overruns=2, tick_span_s=2.99))
    control = stats.summary()["control"]
    assert (control["ticks"], control["overruns"]) == (300, 2) and control["achieved_hz"] == pytest.approx(100.0)
    # The PNG says what the JSON says, and that its plot lacks the missed ticks.
    assert stats.plot_title() == ("control loop: 300 ticks (the newest 100 shown), 2 overruns; incomplete: 200 "
                                  "ticks' events missed")
    stats.exact_counts(SimpleNamespace(undelivered_events=0, ticks=1, overruns=0, tick_span_s=0.0))   # nothing lost


def test_an_output_that_names_the_robot_config_or_the_estop_file_is_refused(sim, tmp_path, capsys):
    """`--json robot.json` replaced the config with the timing summary (the next run could not load it)."""
    path = tmp_path / "robot.json"
    data = config_data(sim)
    data["estop"] = {"file": "stop.flag"}
    path.write_text(json.dumps(data))
    before = path.read_text()
    assert cli.main(["run", str(path), "--seconds", "1", "--json", str(path)]) == 2
    assert f"--json {path} is the robot config: the run would write over it" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--seconds", "1", "--record", str(tmp_path / "stop.flag")]) == 2
    assert "is the e-stop file" in capsys.readouterr().err
    assert path.read_text() == before and not (tmp_path / "stop.flag").exists()
    assert cli.main(["bench", str(path), "--seconds", "1", "--record", str(path)]) == 2
    assert "--record" in capsys.readouterr().err and path.read_text() == before
