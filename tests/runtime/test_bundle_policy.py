"""The bundle policy: a frame and an instruction in, a Plan out; forced depth, steering, refusals, the loop registry."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from edgeact.runtime import stage_io as io
from edgeact.runtime.answer import trace_to_pixels
from edgeact.runtime.bundle_policy import BundlePolicy, BundlePolicyConfig
from edgeact.runtime.decode_program import DEFAULT_DRAFT_TOKENS
from edgeact.runtime.errors import BundleError, ConfigError, GrammarError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.policy import Observation, Plan, Policy, PolicyContext, policy_type
from tests.runtime.test_decode_program import FRAME_PX, choices_made, exported_bundle

DEPTH = (np.arange(100) * 11) % 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory, "D")


@pytest.fixture(scope="module")
def policy(exported):
    return BundlePolicy(exported.bundle_dir, threads=1, prefill_chunk=96)


def observation(exported, frame=7, instruction="pick up the red block", depth_m=None) -> Observation:
    rgb, _, _ = exported.observation(frame, instruction)
    return Observation(rgb=rgb, depth_m=depth_m, timestamp_s=12.5, proprio=None, instruction=instruction)


def test_a_step_gives_the_plan_of_the_reference_answer(exported, policy):
    obs = observation(exported)
    plan = policy.step(obs)
    assert isinstance(policy, Policy) and isinstance(plan, Plan)
    _, inputs, prompt = exported.observation(7)
    reference = exported.reference(prompt, inputs, AnswerGrammar(exported.tokenizer, exported.layout))
    answer = policy.grammar.parse_ids(reference)
    np.testing.assert_array_equal(plan.depth_codes, answer.depth_codes)
    np.testing.assert_allclose(plan.trace_px, trace_to_pixels(answer.trace, *FRAME_PX))
    assert plan.actions.shape == (1, 7) and plan.observation_time_s == 12.5 and plan.created_time_s > 0
    assert {"preprocess", "vision", "prefill", "decode", "parse"} <= set(plan.stage_seconds)
    assert plan.decode_steps >= 100      # depth decoded by the model: 100 sequential choices
    assert plan.choices == choices_made(policy.grammar, reference) == plan.decode_steps + 1     # no draft yet


def test_the_vit_runs_once_per_crop_then_the_connector_once_over_all_crops(exported, policy, monkeypatch):
    calls = []
    for engine, tensor in ((policy.vision.vit, io.IMAGES), (policy.vision.connector, io.PATCH_FEATURES)):
        def counted(feeds, release=True, run=engine.run, name=engine.spec.name, tensor=tensor):
            calls.append((name, feeds[tensor].shape[0]))
            return run(feeds, release=release)
        monkeypatch.setattr(engine, "run", counted)
    rgb, inputs, _ = exported.observation(9)
    policy.infer(rgb, "pick up the red block", depth_codes=DEPTH)
    n_crops = len(inputs.images)
    assert n_crops > 1 and calls == [(io.VISION_STAGE, 1)] * n_crops + [(io.CONNECTOR_STAGE, n_crops)]


def test_forced_depth_and_steering_cut_the_decode_steps(exported):
    policy = BundlePolicy(exported.bundle_dir, threads=1, forced_depth=DEPTH)
    forced = policy.infer(*_frame(exported))
    np.testing.assert_array_equal(forced.depth_codes, DEPTH)
    policy.steer([[30, 40], [200, 100]])
    steered = policy.step(observation(exported))
    np.testing.assert_allclose(steered.trace_px, trace_to_pixels(np.array([[30, 40], [200, 100]]), *FRAME_PX))
    assert steered.decode_steps == 6 < forced.decode_steps
    # Marked as given and as the path steer() keeps (runtime/trace_follow.py follows it on); the model's own is not.
    assert steered.trace_forced and steered.trace_kept
    mine = policy.step(observation(exported))
    assert mine.trace_kept and np.array_equal(mine.trace_px, steered.trace_px)
    policy.steer(None)
    own = policy.step(observation(exported))
    assert not own.trace_forced and not own.trace_kept
    assert policy.infer(*_frame(exported)).token_ids.tolist() == forced.token_ids.tolist()


def test_steps_draft_from_the_last_answer_until_the_instruction_changes(exported):
    plain, drafting = (BundlePolicy(exported.bundle_dir, threads=1, draft_tokens=n) for n in (0, 16))
    for instruction, drafted in (("pick up the red block", False), ("pick up the red block", True),
                                 ("push the blue box to the left", False)):
        rgb, _, _ = exported.observation(7, instruction)
        one, two = (p.infer(rgb, instruction) for p in (plain, drafting))
        assert two.token_ids.tolist() == one.token_ids.tolist()
        # Drafted: the depth codes' 100 choices and the rest settle several per call; another instruction's first
        # step has no answer of its own to draft from.
        assert (two.decode_steps * 4 <= one.decode_steps) if drafted else (two.decode_steps == one.decode_steps)


def test_steer_refuses_a_malformed_trace_at_once_and_keeps_the_last_one(exported):
    policy = BundlePolicy(exported.bundle_dir, threads=1, forced_depth=DEPTH)
    policy.steer([[30, 40]])
    for bad in ([[10, 20, 30], [40, 50, 60]], [10, 20, 30, 40], [[12.9, 200.99]], [[320, 240]], [[1, 1]] * 6, []):
        with pytest.raises(GrammarError, match=r"^steer\(\) needs "):
            policy.steer(bad)
    assert policy.steering_trace.tolist() == [[30, 40]]
    assert policy.step(observation(exported)).trace_px.shape == (1, 2)     # the loop's next step still plans
    policy.steer(np.array([[12.0, 200.0]]))                                 # integral floats: taken as they are
    assert policy.steering_trace.tolist() == [[12, 200]] and policy.steering_trace.dtype == np.int64
    with pytest.raises(GrammarError, match=r"^a forced trace needs 1\.\.5 points \[x, y\], an \(n, 2\) array; got "
                                           r"\(2, 3\)"):
        policy.infer(*_frame(exported), trace=np.array([[1, 2, 3], [4, 5, 6]]))


def test_a_bundle_without_norm_stats_warns_and_the_robot_config_refuses_it(exported, tmp_path, caplog):
    from edgeact.export.bundle_writer import update_manifest

    dst = shutil.copytree(exported.bundle_dir, tmp_path / "nostats")
    update_manifest(dst, lambda m: setattr(m, "norm_stats", {}))
    with caplog.at_level("WARNING", logger="edgeact.runtime.bundle_policy"):
        policy = BundlePolicy(dst, threads=1, forced_depth=DEPTH)
    assert policy.stats is None
    problem = (rf"^{dst}: the bundle has no norm_stats, so its actions are normalized bin centres in \[-1, 1\], not "
               r"robot units .*re-export it from a checkpoint whose config\.json has norm_stats")
    assert [r for r in caplog.records if re.match(problem + r".*; Plan\.actions are normalized$", r.getMessage())]
    with pytest.raises(ConfigError, match=problem):
        BundlePolicyConfig(path="nostats", threads=1).make_policy(PolicyContext(action_rate_hz=10.0,
                                                                                config_dir=tmp_path))


def test_a_depth_tokenizer_reads_the_observation_depth(exported):
    seen = []

    def tokenizer(depth_m):
        seen.append(depth_m.shape)
        return DEPTH

    policy = BundlePolicy(exported.bundle_dir, threads=1, forced_depth=tokenizer)
    depth_m = np.full(FRAME_PX[::-1], 0.8, np.float32)
    plan = policy.step(observation(exported, depth_m=depth_m))
    assert seen == [depth_m.shape] and "depth_tokenizer" in plan.stage_seconds
    np.testing.assert_array_equal(plan.depth_codes, DEPTH)
    # A frame without depth: the model decodes depth, and the policy counts it.
    plan = policy.step(observation(exported))
    assert policy.depth_fallbacks == 1 and plan.decode_steps >= 100


def test_inputs_that_cannot_be_used_are_refused_before_any_stage_runs(exported):
    """A prompt the longest answer would not fit after, depth not aligned to the frame, forced depth codes of another
    shape or count: refused first, naming the input (infer is usable without an Observation's checks)."""
    from edgeact.runtime.errors import EdgeactError, SequenceTooLongError

    policy = BundlePolicy(exported.bundle_dir, threads=1)
    ran = []
    real = policy.vision.run
    policy.vision.run = lambda *a: ran.append("vision") or real(*a)
    rgb, _, _ = exported.observation(7, "pick up the red block")
    with pytest.raises(SequenceTooLongError, match="shorten the instruction"):
        policy.infer(rgb, "push the red block " * 400)
    with pytest.raises(EdgeactError, match=r"depth_m of shape \(10, 10\) is not aligned to the frame"):
        policy.infer(rgb, "pick up the red block", depth_m=np.ones((10, 10), np.float32))
    with pytest.raises(GrammarError, match=r"a flat sequence of 100 or a 10x10 grid; got shape \(2, 50\)"):
        policy.infer(rgb, "pick up the red block", depth_codes=DEPTH.reshape(2, 50))
    assert ran == []
    with pytest.raises(ConfigError, match=r"forced_depth: forced depth needs 100 codes in \[0, 128\), got 3 codes"):
        BundlePolicy(exported.bundle_dir, forced_depth=[1, 2, 3])
    assert policy.infer(rgb, "pick up the red block", depth_codes=DEPTH.reshape(10, 10)).depth_codes.tolist() == \
        DEPTH.tolist()


def test_sensor_depth_needs_a_depth_tokenizer_stage(exported):
    with pytest.raises(BundleError, match="forced_depth='sensor' needs a 'depth_tokenizer' stage"):
        BundlePolicy(exported.bundle_dir, forced_depth="sensor")
    with pytest.raises(ConfigError, match="forced_depth 'lidar' unknown"):
        BundlePolicy(exported.bundle_dir, forced_depth="lidar")


def test_a_bundle_that_failed_verification_is_refused_unless_allowed(exported, tmp_path):
    dst = shutil.copytree(exported.bundle_dir, tmp_path / "failed")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["verification"] = {"status": "failed", "gates": {},
                                "results": [{"gate": "tokens.greedy.action", "passed": False, "value": 0.4, "limit": 0.7}]}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="verification failed at gate 'tokens.greedy.action'.*--allow-unverified"):
        BundlePolicy(dst)
    assert BundlePolicy(dst, threads=1, allow_unverified=True).infer(*_frame(exported)).actions.shape == (1, 7)


def test_a_robot_config_is_told_its_own_fix_for_a_failed_bundle(exported, tmp_path):
    """`edgeact run` has no --allow-unverified: the robot config's policy field is what lets it run."""
    dst = shutil.copytree(exported.bundle_dir, tmp_path / "failed")
    manifest = json.loads((dst / "manifest.json").read_text())
    row = {"gate": "tokens.greedy.action", "passed": False, "value": 0.4, "limit": 0.7}
    manifest["verification"] = {"status": "failed", "gates": {}, "results": [row]}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    context = PolicyContext(action_rate_hz=10.0, config_dir=tmp_path)
    with pytest.raises(BundleError) as err:
        BundlePolicyConfig(path="failed", threads=1).make_policy(context)
    msg = str(err.value)
    assert "verification failed at gate 'tokens.greedy.action'" in msg
    assert "to run it anyway: set `allow_unverified: true` in the robot config's policy section" in msg
    assert msg.endswith("set it there, and run `edgeact run robot.json`)")
    assert "--allow-unverified" not in msg
    assert BundlePolicyConfig(path="failed", threads=1, allow_unverified=True).make_policy(context)


def test_a_never_verified_bundle_loads_with_a_warning_naming_how_to_verify_it(exported, tmp_path, caplog):
    from edgeact.export.bundle_writer import update_manifest
    from edgeact.runtime.bundle import VerificationInfo, read_manifest

    manifest = read_manifest(exported.bundle_dir)
    assert manifest.verification.status == "not_run"          # exported without verification
    with caplog.at_level("WARNING", logger="edgeact.runtime.bundle_policy"):
        BundlePolicy(exported.bundle_dir, threads=1)
    (record,) = [r for r in caplog.records if r.name == "edgeact.runtime.bundle_policy"]
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith(f"{exported.bundle_dir}: never verified (verification 'not_run'")
    assert (f"verify it with `edgeact verify {exported.bundle_dir} --checkpoint "
            f"{manifest.model.source_checkpoint}`") in record.getMessage()

    caplog.clear()
    verified = shutil.copytree(exported.bundle_dir, tmp_path / "verified")
    update_manifest(verified, lambda m: setattr(m, "verification", VerificationInfo(
        "passed", {}, tuple({"gate": f"{stage}.cosine", "stage": stage, "passed": True} for stage in m.stages))))
    with caplog.at_level("WARNING", logger="edgeact.runtime.bundle_policy"):
        BundlePolicy(verified, threads=1)
    assert [r for r in caplog.records if r.name == "edgeact.runtime.bundle_policy"] == []


def test_unnorm_key_must_name_the_bundle_statistics(exported):
    with pytest.raises(ConfigError, match="unnorm_key 'bridge' not in norm_stats; available keys: edgeact_sim"):
        BundlePolicy(exported.bundle_dir, unnorm_key="bridge")


def test_registered_as_policy_type_bundle(exported, tmp_path):
    assert policy_type("bundle") is BundlePolicyConfig
    link = tmp_path / "bundles"
    link.mkdir()
    shutil.copytree(exported.bundle_dir, link / "tiny")
    config = BundlePolicyConfig(path="bundles/tiny", threads=1, prefill_chunk=64, crops_per_run=3)
    policy = config.make_policy(PolicyContext(action_rate_hz=10.0, config_dir=tmp_path))
    assert isinstance(policy, BundlePolicy) and policy.decoder.max_chunk == 64
    assert policy.vision.crops_per_run == 3
    assert policy.program.draft_tokens == DEFAULT_DRAFT_TOKENS > 0      # a robot's policy drafts by default
    assert BundlePolicy(exported.bundle_dir, threads=1).program.draft_tokens == 0      # a library caller's does not
    with pytest.raises(ConfigError, match="draft_tokens: -2 must be an integer >= 0"):
        BundlePolicyConfig(path="x", draft_tokens=-2)
    with pytest.raises(ConfigError, match="crops_per_run: 0 must be >= 1"):
        BundlePolicyConfig(path="x", crops_per_run=0)
    with pytest.raises(ConfigError, match="path: the bundle directory is required"):
        BundlePolicyConfig()
    with pytest.raises(ConfigError, match="forced_depth: 'stereo' unknown"):
        BundlePolicyConfig(path="x", forced_depth="stereo")


@pytest.mark.parametrize("fields, message", [
    ({"backend": "TensorRT"}, r"backend: 'TensorRT' unknown; use one of onnxruntime, tensorrt"),
    ({"provider": "gpu"}, r"provider: 'gpu' unknown; use one of cpu, cuda, tensorrt"),
    ({"backend": "tensorrt", "threads": 2}, r"threads: onnxruntime's setting, and backend is 'tensorrt'"),
    ({"backend": "tensorrt", "provider": "cuda"}, r"provider: onnxruntime's setting, and backend is 'tensorrt'"),
    ({"target": "orin"}, r"target: which TensorRT engines backend 'tensorrt' runs; backend is 'onnxruntime'"),
    ({"backend": "tensorrt", "target": "orin_nx"}, r"target: unknown TensorRT target 'orin_nx'; use one of"),
])
def test_settings_of_the_other_backend_are_named_when_the_config_loads(fields, message):
    """Found with the field named, not as a TypeError of an options class when the policy loads."""
    with pytest.raises(ConfigError, match=message):
        BundlePolicyConfig(path="x", **fields)


def test_tf32_is_asked_for_the_gpu_providers_only(monkeypatch):
    from edgeact.runtime import bundle_policy

    made = {}
    monkeypatch.setattr(bundle_policy, "BundlePolicy", lambda path, backend, **kw: made.update(kw))
    BundlePolicyConfig(path="/b", provider="cuda", cuda_tf32=True).make_policy(PolicyContext(action_rate_hz=10.0))
    assert made["backend_options"] == {"provider": "cuda", "cuda_tf32": True}
    BundlePolicyConfig(path="/b", provider="cuda").make_policy(PolicyContext(action_rate_hz=10.0))
    assert made["backend_options"] == {"provider": "cuda"}          # fp32 stays fp32 unless asked
    for provider in (None, "cpu"):
        with pytest.raises(ConfigError, match="cuda_tf32: applies to onnxruntime's cuda and tensorrt providers"):
            BundlePolicyConfig(path="/b", provider=provider, cuda_tf32=True)


def test_run_sizes_default_to_host_memory_on_a_cpu_and_to_one_run_on_a_gpu(exported, monkeypatch):
    from edgeact.runtime import bundle_policy, ort_engine

    cpu = BundlePolicy(exported.bundle_dir, threads=1)
    assert cpu.decoder.max_chunk == bundle_policy.DEFAULT_PREFILL_CHUNK and cpu.vision.crops_per_run == 1
    # A GPU backend (here onnxruntime on the CPU, flagged as on a device): the prompt in one run, every crop at once.
    monkeypatch.setattr(ort_engine.OrtBackend, "on_device", True, raising=False)
    monkeypatch.setattr(ort_engine.OrtBackend, "__init__", lambda self, **o: setattr(self, "options",
                                                                                      ort_engine.OrtOptions(**o)))
    gpu = BundlePolicy(exported.bundle_dir, threads=1)
    assert gpu.decoder.max_chunk == min(bundle_policy.DEVICE_PREFILL_CHUNK, gpu.decoder.layout.max_seq)
    assert gpu.vision.crops_per_run == gpu.vision.max_crops
    rgb, instruction = _frame(exported)
    one, batched = cpu.infer(rgb, instruction), gpu.infer(rgb, instruction)
    assert one.token_ids.tolist() == batched.token_ids.tolist()
    assert BundlePolicy(exported.bundle_dir, threads=1, prefill_chunk=32, crops_per_run=2).vision.crops_per_run == 2


def _frame(exported):
    rgb, _, _ = exported.observation(7)
    return rgb, "pick up the red block"
