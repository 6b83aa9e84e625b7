"""`edgeact bench-compare`: bundles measured side by side in one process, round by round, in alternating order."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeact.runtime import bench_compare
from edgeact.runtime import stage_io as io
from edgeact.runtime.bench_compare import CompareOptions, compare_bundles, labels_for, orders
from edgeact.runtime.bundle_policy import BundlePolicy
from edgeact.runtime.cli import main
from edgeact.runtime.errors import ConfigError
from tests.runtime.test_decode_program import exported_bundle

SMALL = CompareOptions(threads=1, rounds=3, decode_steps=2, frames=2, frame_px=(96, 72), past=40)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return [exported_bundle(tmp_path_factory, "D").bundle_dir,
            exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION).bundle_dir]


def test_every_round_measures_every_bundle_first_in_turn_and_forces_the_first_bundles_codes(bundles, monkeypatch):
    rate_calls, infers = [], []
    real_rate, real_infer = bench_compare.decode_rate, BundlePolicy.infer

    def which(policy) -> str:
        return Path(policy.bundle.root).parent.name       # the fixtures' folders differ, their bundles' names not

    def rate(policy, past, steps, warmup=4):
        rate_calls.append((which(policy), past, steps))
        return real_rate(policy, past, steps, warmup)

    def infer(self, rgb, instruction, **kwargs):
        result = real_infer(self, rgb, instruction, **kwargs)
        infers.append((which(self), kwargs.get("depth_codes"), result.depth_codes))
        return result

    monkeypatch.setattr(bench_compare, "decode_rate", rate)
    monkeypatch.setattr(BundlePolicy, "infer", infer)
    report = compare_bundles(bundles, SMALL)

    first, second = (Path(b).parent.name for b in bundles)
    assert first != second
    assert [name for name, _, _ in rate_calls] == [first, second, second, first, first, second]
    assert {(past, steps) for _, past, steps in rate_calls} == {(40, 2)}
    rows = report["bundles"]
    assert [r["bundle"] for r in rows] == labels_for([Path(b) for b in bundles])
    assert report["decode_context_tokens"] == 40
    assert all(len(r["decode_rates"]) == 3 and len(r["policy_steps_s"]) == 2 and len(r["forced_depth_steps_s"]) == 2
               for r in rows)
    assert rows[0]["decode_vs_first"] == rows[0]["policy_vs_first"] == rows[0]["forced_vs_first"] == 1.0
    assert rows[1]["decode_vs_first"] == pytest.approx(rows[1]["decode_steps_per_s"] / rows[0]["decode_steps_per_s"])
    assert rows[1]["policy_vs_first"] == pytest.approx(rows[0]["policy_step_s"] / rows[1]["policy_step_s"])
    # Forced depth: both bundles got, for each frame, the codes the first bundle decoded for it (untimed, beforehand);
    # the warm-up's zero codes aside.
    untimed = [codes for name, given, codes in infers if name == first and given is None][:2]
    forced = [(name, np.asarray(given)) for name, given, _ in infers if given is not None and np.any(given)]
    assert len(forced) == 2 * 2 and {name for name, _ in forced} == {first, second}
    assert all(any(np.array_equal(given, codes) for codes in untimed) for _, given in forced)
    # Each bundle warmed up once, untimed, with as many codes as its grammar's depth segment takes.
    warm = [np.asarray(given) for _, given, _ in infers if given is not None and not np.any(given)]
    assert len(warm) == 2 and all(len(codes) == 100 for codes in warm)
    assert report["options"]["policy_rounds"] == SMALL.policy_rounds == 1      # half of 3 decode rounds


def test_the_command_prints_the_table_and_writes_the_json(bundles, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["bench-compare", *map(str, bundles), "--threads", "1", "--rounds", "2", "--decode-steps", "2",
                 "--frames", "1", "--past", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bundles side by side" in printed and "vs first" in printed and "1.00x" in printed
    report = json.loads((out / "bench-compare.json").read_text())
    assert [r["path"] for r in report["bundles"]] == [str(b) for b in bundles]
    assert report["options"]["rounds"] == 2 and report["decode_context_tokens"] == 30
    # A context past the KV cache is refused, not clamped and reported as the one asked for.
    assert main(["bench-compare", *map(str, bundles), "--threads", "1", "--rounds", "1", "--decode-steps", "1",
                 "--frames", "1", "--past", "100000", "--out", str(tmp_path / "past")]) == 2
    assert "--past 100000: the bundle's KV cache holds" in capsys.readouterr().err


def test_labels_orders_and_refusals():
    assert labels_for([Path("a/fp32"), Path("b/fp32"), Path("b/int8")]) == ["a/fp32", "b/fp32", "int8"]
    assert labels_for([Path("a/fp32"), Path("a/fp32")]) == ["a/fp32 (1)", "a/fp32 (2)"]
    assert orders(["x", "y", "z"], 3) == [["x", "y", "z"], ["z", "y", "x"], ["x", "y", "z"]]
    with pytest.raises(ConfigError, match="device 'rocm' unknown"):
        CompareOptions(device="rocm")
    with pytest.raises(ConfigError, match="rounds is 0"):
        CompareOptions(rounds=0)
    with pytest.raises(ConfigError, match="past is -1"):
        CompareOptions(past=-1)
    with pytest.raises(ConfigError, match="no bundles to compare"):
        compare_bundles([])
