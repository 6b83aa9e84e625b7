"""`edgeact motors scan | setup | sim` against the simulator, in process and as the installed command."""
import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeact.drivers.commands import parse_ids
from edgeact.runtime.cli import main

pytestmark = pytest.mark.timeout(30)
EDGEACT = Path(sys.executable).with_name("edgeact")


def test_scan_prints_a_table_of_the_simulated_motors(start_sim, capsys):
    sim = start_sim("feetech", ids=[1, 2, 3])
    assert main(["motors", "scan", "--port", sim.port, "--protocol", "feetech", "--ids", "1-5", "--timeout", "0.1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "sts3215" in line]
    assert len(rows) == 3 and all("1000000" in row and "777" in row for row in rows)
    assert [row.split("│")[3].strip() for row in rows] == ["1", "2", "3"]


def test_scan_tries_both_protocols_by_default(start_sim, capsys):
    sim = start_sim("dynamixel", ids=[4], baud_rate=57_600)
    assert main(["motors", "scan", "--port", sim.port, "--ids", "1-5", "--baud", "57600", "1000000",
                 "--timeout", "0.05"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "xl430-w250" in line]
    assert len(rows) == 1 and "dynamixel" in rows[0] and "57600" in rows[0] and "1060" in rows[0]


def test_scan_with_nothing_attached_says_what_to_check(start_sim, capsys):
    sim = start_sim("feetech", ids=[])
    assert main(["motors", "scan", "--port", sim.port, "--protocol", "feetech", "--baud", "1000000",
                 "--ids", "1-3", "--timeout", "0.05"]) == 2
    err = capsys.readouterr().err
    assert f"edgeact motors: error: no motor answered on {sim.port} (feetech at 1000000 baud); check the power" in err


def test_scan_warns_about_colliding_ids(start_sim, capsys):
    sim = start_sim("feetech", ids=[1, 2, 2])
    assert main(["motors", "scan", "--port", sim.port, "--protocol", "feetech", "--baud", "1000000",
                 "--ids", "1-3", "--timeout", "0.05"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "id 2 at 1000000 baud (feetech): replies collide; two motors probably share this id" in out


def test_setup_with_yes_flashes_the_single_motor(start_sim, capsys):
    sim = start_sim("feetech", ids=[1])
    assert main(["motors", "setup", "--port", sim.port, "--protocol", "feetech", "--id", "4", "--baud", "500000",
                 "--search-baud", "1000000", "--search-ids", "0-7", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "found sts3215 (model 777) with id 1 at 1000000 baud" in out
    assert "done: the sts3215 now answers as id 4 at 500000 baud" in out
    assert (sim.register(4, "id"), sim.servos[0].baud_rate) == (4, 500_000)


def test_setup_asks_first_and_writes_nothing_when_declined(start_sim, capsys, monkeypatch):
    sim = start_sim("dynamixel", ids=[1])
    answers = iter(["", "n"])
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt: prompts.append(prompt) or next(answers))
    assert main(["motors", "setup", "--port", sim.port, "--protocol", "dynamixel", "--id", "3", "--baud", "1000000",
                 "--search-baud", "1000000", "--search-ids", "0-7"]) == 1
    assert "Connect ONLY the motor to set up" in prompts[0] and "Write id 3 and baud rate 1000000" in prompts[1]
    assert "aborted; nothing was written" in capsys.readouterr().out
    assert not [i for i in sim.received if i.code == 0x03]     # not a single write instruction


def test_setup_without_a_terminal_to_confirm_on_says_so(start_sim, capsys, monkeypatch):
    sim = start_sim("feetech", ids=[1])

    def no_terminal(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_terminal)
    assert main(["motors", "setup", "--port", sim.port, "--protocol", "feetech", "--id", "3", "--baud", "1000000"]) == 2
    assert "stdin has none; run it in a terminal, or pass --yes once only the motor" in capsys.readouterr().err
    assert not [i for i in sim.received if i.code == 0x03]


def test_setup_checks_the_requested_settings_before_asking(capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt: pytest.fail("asked before checking the settings"))
    assert main(["motors", "setup", "--port", "/dev/ttyNOPE0", "--protocol", "dynamixel", "--id", "3",
                 "--baud", "128000"]) == 2
    assert "baud rate 128000 not supported by dynamixel motors; use one of 9600, 57600" in capsys.readouterr().err


def test_setup_refuses_two_motors(start_sim, capsys):
    sim = start_sim("dynamixel", ids=[1, 2])
    assert main(["motors", "setup", "--port", sim.port, "--protocol", "dynamixel", "--id", "3", "--baud", "1000000",
                 "--search-baud", "1000000", "--search-ids", "0-7", "--yes"]) == 2
    assert "2 motors answer on" in capsys.readouterr().err and sim.register(1, "id") == 1


def test_parse_ids():
    assert parse_ids("1-3,7, 9") == [1, 2, 3, 7, 9]
    for bad in ("a-b", "300", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_ids(bad)
    for reversed_ids, shown, fix in (("5-1", "5-1", "1-5"), ("1-3,9-7", "9-7", "7-9")):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"ids '{reversed_ids}': the range {shown} is reversed; "
                                                             rf"write it low to high, {fix}"):
            parse_ids(reversed_ids)


def test_sim_command_serves_a_port_that_scan_finds(capsys):
    """A new user's first run: `edgeact motors sim` in one terminal, `edgeact motors scan` in another."""
    proc = subprocess.Popen([str(EDGEACT), "motors", "sim", "--protocol", "dynamixel", "--ids", "1,2",
                             "--duration", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("simulated dynamixel bus: motors 1, 2 (xl430-w250) at 1000000 baud on /dev/pts/"), first
        port = first.rsplit(" ", 1)[1].strip()
        assert main(["motors", "scan", "--port", port, "--protocol", "dynamixel", "--baud", "1000000",
                     "--ids", "0-4", "--timeout", "0.1"]) == 0
        assert len([line for line in capsys.readouterr().out.splitlines() if "xl430-w250" in line]) == 2
    finally:
        proc.send_signal(signal.SIGINT)                  # Ctrl-C: the simulator stops cleanly
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "stopped" in out, err
    assert not os.path.exists(port)


@pytest.mark.parametrize("duration", ["-5", "0"])
def test_a_simulated_bus_for_no_time_is_refused(duration, capsys):
    with pytest.raises(SystemExit) as exit_info:        # argparse: usage and the reason, status 2
        main(["motors", "sim", "--duration", duration])
    assert exit_info.value.code == 2 and "--duration" in capsys.readouterr().err
