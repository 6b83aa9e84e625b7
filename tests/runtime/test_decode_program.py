"""The decode program gives exactly the tokens of masked greedy decoding with the full PyTorch model, in far fewer steps.

Also the home of `exported_bundle`: tiny synthetic checkpoints exported once per test session
(fp32, max_seq 512) that the other runtime-engine tests share.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig
from edgeact.runtime import stage_io as io
from edgeact.runtime.action_bins import ActionStats, unnormalize_actions
from edgeact.runtime.answer import trace_to_pixels
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.decode_program import DecodeProgram
from edgeact.runtime.engines import open_backend
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.grammar_walk import Forced, MaskedGreedyConstraint, answer_steps
from edgeact.runtime.preprocess import ImagePreprocessor
from edgeact.runtime.preprocess_config import PreprocessConfig
from edgeact.runtime.prompt import build_prompt_ids
from edgeact.runtime.token_layout import TokenLayout, load_tokenizer
from edgeact.runtime.vision_stages import VisionStages

MAX_SEQ = 512                      # prompt (~165 tokens for 160x120 frames) + answer (~190) fit
FRAME_PX = (160, 120)
_EXPORTS: dict[str, "Exported"] = {}


class Exported:
    """A tiny synthetic checkpoint, its fp32 bundle, and what turns a frame into stage inputs."""

    def __init__(self, root, variant: str, attention: str = io.FUSED_ATTENTION):
        from edgeact.export.bundle_export import ExportOptions, export_bundle
        from edgeact.export.synthetic import make_checkpoint

        self.variant, self.attention = variant, attention
        self.checkpoint = make_checkpoint(variant, "tiny", seed=5, out_dir=root / "checkpoint")
        self.bundle_dir = export_bundle(self.checkpoint, root / "bundle", ExportOptions(max_seq=MAX_SEQ, attention=attention))
        self.bundle = load_bundle(self.bundle_dir)
        self.tokenizer = load_tokenizer(self.bundle.path("tokenizer.json"))
        self.layout = TokenLayout.from_tokenizer(self.tokenizer)
        self.preprocessor = ImagePreprocessor(self.bundle.config,
                                              PreprocessConfig.load(self.bundle.path("preprocessor_config.json"),
                                                                    self.bundle.config))
        self._model = None

    @property
    def model(self):
        if self._model is None:
            import torch

            from edgeact.export.checkpoint import load_model

            torch.set_num_threads(1)     # tiny tensors: extra threads only spin on a shared CPU
            self._model = load_model(self.checkpoint)[0]
        return self._model

    def observation(self, frame: int, instruction: str = "pick up the red block"):
        rgb = SyntheticCamera(SyntheticConfig(width=FRAME_PX[0], height=FRAME_PX[1])).render(frame).color
        inputs = self.preprocessor(rgb)
        return rgb, inputs, build_prompt_ids(self.tokenizer, self.layout, instruction, inputs)

    def reference(self, prompt, inputs, grammar, depth_codes=None, trace=None) -> list[int]:
        """Masked greedy decoding with the full PyTorch model, one token per step."""
        import torch

        from edgeact.export.generate import generate_greedy

        tensors = [torch.from_numpy(np.array(a)) for a in (inputs.images, inputs.image_masks, inputs.pooled_patches_idx)]
        return generate_greedy(self.model, torch.from_numpy(prompt)[None], *tensors, max_new_tokens=600,
                               eos_token_id=self.layout.bos_id,
                               allowed_token_fn=MaskedGreedyConstraint(grammar, depth_codes=depth_codes, trace=trace)).token_ids


def exported_bundle(tmp_path_factory, variant: str, attention: str = io.FUSED_ATTENTION) -> Exported:
    """The tiny bundle of a variant with this form of the decoder (fused: the CPU default), exported once per session."""
    if (variant, attention) not in _EXPORTS:
        _EXPORTS[variant, attention] = Exported(tmp_path_factory.mktemp(f"runtime_bundle_{variant}_{attention}"),
                                                variant, attention)
    return _EXPORTS[variant, attention]


def choices_made(grammar: AnswerGrammar, tokens, depth_codes=None, trace=None) -> int:
    """How many answer tokens were picked from a closed set of more than one id (replaying the walk)."""
    walk, i, n = answer_steps(grammar, depth_codes=depth_codes, trace=trace), 0, 0
    step = next(walk)
    while True:
        if isinstance(step, Forced):
            i, sent = i + len(step.ids), None
        else:
            n += len(step.ids) > 1
            sent, i = int(tokens[i]), i + 1
        try:
            step = walk.send(sent)
        except StopIteration:
            return n


class Runner:
    def __init__(self, exported: Exported, n_actions: int = 1, max_chunk: int = 64, action_decoding: str = "greedy",
                 draft_tokens: int = 0):
        self.exported = exported
        backend = open_backend("onnxruntime", threads=1)
        bundle = exported.bundle
        self.vision = VisionStages(backend.stage(bundle, io.VISION_STAGE), backend.stage(bundle, io.CONNECTOR_STAGE))
        self.grammar = AnswerGrammar(exported.tokenizer, exported.layout, n_actions=n_actions)
        self.stats = ActionStats.from_norm_stats(bundle.manifest.norm_stats)
        self.program = DecodeProgram(backend.decoder(bundle, max_chunk), bundle.weight(io.EMBEDDING_WEIGHT),
                                     bundle.weight(io.LM_HEAD_WEIGHT), self.grammar, bundle.config.image_patch_id,
                                     self.stats, action_decoding, draft_tokens)

    def run(self, prompt, inputs, **forced):
        features = self.vision.run(inputs.images, inputs.image_masks, inputs.pooled_patches_idx)
        return self.program.run(prompt, features, inputs.pooled_patches_idx, image_size_px=FRAME_PX, **forced)


@pytest.fixture(scope="module", params=[(v, a) for a in io.DECODER_ATTENTIONS for v in ("D", "O")],
                ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    return exported_bundle(tmp_path_factory, *request.param)


FORCED_DEPTH = (np.arange(100) * 37) % 128
FORCED_TRACE = [[12, 200], [90, 7], [255, 0]]


@pytest.mark.parametrize("forced", ["none", "depth", "trace", "depth+trace"])
def test_tokens_are_identical_to_masked_greedy_decoding_of_the_reference(exported, forced):
    depth = FORCED_DEPTH if "depth" in forced else None
    trace = FORCED_TRACE if "trace" in forced else None
    runner = Runner(exported, max_chunk=64)     # the ~165-token prompt goes in 3 chunks
    for frame, instruction in ((3, "pick up the red block"), (8, "push the green box to the left")):
        _, inputs, prompt = exported.observation(frame, instruction)
        reference = exported.reference(prompt, inputs, runner.grammar, depth, trace)
        result = runner.run(prompt, inputs, depth_codes=depth, trace=trace)
        assert result.token_ids.tolist() == reference
        # One decoder call per real choice after the prefill; the last choice's token is never fed.
        assert result.choices == choices_made(runner.grammar, reference, depth, trace)
        assert result.decode_steps == result.choices - 1
        if depth is not None:
            np.testing.assert_array_equal(result.depth_codes, depth)
        if trace is not None:
            np.testing.assert_array_equal(result.trace, trace)


# A robot's stream: the same view twice (its own answer is the draft), another view (a draft that goes wrong at
# once), then the first view again (a draft of another scene's answer).
DRAFT_STREAM = ((3, "pick up the red block"), (3, "pick up the red block"), (8, "push the green box to the left"),
                (3, "pick up the red block"))


@pytest.mark.parametrize("forced", ["none", "depth", "trace"])
def test_drafting_keeps_the_reference_tokens_and_saves_calls(exported, forced):
    depth = FORCED_DEPTH if forced == "depth" else None
    trace = FORCED_TRACE if forced == "trace" else None
    plain, drafted = Runner(exported, n_actions=2), Runner(exported, n_actions=2, draft_tokens=16)
    results, choices = [], []
    for i, (frame, instruction) in enumerate(DRAFT_STREAM):
        _, inputs, prompt = exported.observation(frame, instruction)
        one, two = plain.run(prompt, inputs, depth_codes=depth, trace=trace), drafted.run(
            prompt, inputs, depth_codes=depth, trace=trace)
        assert two.token_ids.tolist() == one.token_ids.tolist(), f"answer {i}"
        if i == 2:      # a draft from another view's answer, checked against the full PyTorch model too
            assert two.token_ids.tolist() == exported.reference(prompt, inputs, drafted.grammar, depth, trace)
        assert two.choices == one.choices == one.decode_steps + 1      # the same choices, however many calls
        results.append((one.decode_steps, two.decode_steps))
        choices.append(two.choices)
    # No previous answer: only the second action is drafted (from the first), which saves at most its 7 bins' calls.
    assert results[0][0] - 7 <= results[0][1] <= results[0][0]
    # Its own answer as the draft (the actions after the first drafted from the one before them in this answer, which
    # mostly holds too): a call settles several choices (16 drafted tokens hold up to 16 depth codes, or 5-6 action
    # bins with their two-token separators).
    assert results[1][1] * 3 <= results[1][0]
    assert results[1][1] < choices[1] - 1             # what drafting saved: fewer calls than choices after the first
    assert all(two <= one for one, two in results)     # a call settles at least the choice it was made for


@pytest.mark.parametrize("forced", ["none", "depth"])
def test_the_first_answer_drafts_each_action_from_the_one_before(tmp_path_factory, forced):
    exported = exported_bundle(tmp_path_factory, "D")
    depth = FORCED_DEPTH if forced == "depth" else None
    plain, drafted = Runner(exported, n_actions=4), Runner(exported, n_actions=4, draft_tokens=16)
    _, inputs, prompt = exported.observation(5)
    one, two = plain.run(prompt, inputs, depth_codes=depth), drafted.run(prompt, inputs, depth_codes=depth)
    assert two.token_ids.tolist() == one.token_ids.tolist()
    assert two.choices == one.choices and one.decode_steps == one.choices - 1
    bins = np.asarray(one.answer.action_ids).reshape(4, 7)
    repeated = int((bins[1:] == bins[:-1]).sum())      # bins equal to the action before's: what a draft can hold
    # Bins of actions 2..4 that repeat their predecessor's are settled by earlier calls.
    assert one.decode_steps - two.decode_steps >= repeated // 2 > 0


def test_the_draft_offers_the_action_before_then_the_previous_answer_and_adapts_its_length():
    from edgeact.runtime.decode_program import _Draft

    # A prompt of 10; actions of 2 bins + 1 separator, 1 token between actions, 3 actions: stride 4, span 11.
    seq, previous = np.zeros(64, np.int64), np.arange(100, 130)
    draft = _Draft((previous, 5), 8, 10, seq, (4, 11))
    np.testing.assert_array_equal(draft.offer(12, 20), previous[2:10])      # before the actions: by position
    draft.rejected(12)                                                       # the first offered token was wrong
    assert draft.length == 4
    draft.at_action(20)          # the first action bin at answer index 10: the previous answer's at 5
    assert draft.length == 8
    seq[20:24] = [1, 2, 3, 4]    # the first action and the token after it, decided
    # Actions 2 and 3 from the one before (decided, or offered in this call), then the previous answer re-aligned.
    np.testing.assert_array_equal(draft.offer(24, 8), [1, 2, 3, 4, 1, 2, 3, previous[21 - 5]])
    draft.rejected(26)           # wrong past the first offered token: the length stays
    assert draft.length == 8
    assert len(draft.offer(26, 3)) == 3                                      # the call's room trims the offer
    draft.rejected(26)
    assert draft.length == 4
    draft.offer(26, 8)
    draft.held(30)               # every offered token held: the length doubles back
    assert draft.length == 8
    assert len(_Draft(None, 8, 10, seq, (4, 11)).offer(12, 8)) == 0         # no previous answer, not in the actions


def test_a_new_scene_drafts_from_nothing(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    runner = Runner(exported, draft_tokens=8)
    _, inputs, prompt = exported.observation(3)
    first = runner.run(prompt, inputs, depth_codes=FORCED_DEPTH)
    assert runner.run(prompt, inputs, depth_codes=FORCED_DEPTH).decode_steps < first.decode_steps
    runner.program.forget_draft()
    assert runner.run(prompt, inputs, depth_codes=FORCED_DEPTH).decode_steps == first.decode_steps


@pytest.mark.parametrize("draft_tokens", [-1, 2.5, True])
def test_a_draft_length_that_is_no_count_is_refused(tmp_path_factory, draft_tokens):
    exported = exported_bundle(tmp_path_factory, "D")
    with pytest.raises(ConfigError, match="draft_tokens: .* must be an integer >= 0"):
        Runner(exported, draft_tokens=draft_tokens)


def test_drafted_tokens_past_the_answers_end_are_forgotten(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    runner = Runner(exported, draft_tokens=16)
    _, inputs, prompt = exported.observation(3)
    answer = runner.run(prompt, inputs, depth_codes=FORCED_DEPTH)
    ids, actions_at = runner.program._previous
    # A previous answer with more after its actions than this one has (as a longer grammar's would): the last call
    # feeds drafted tokens beyond this answer's end, which the cache must not keep.
    runner.program._previous = (np.concatenate([ids, ids[-20:]]), actions_at)
    again = runner.run(prompt, inputs, depth_codes=FORCED_DEPTH)
    assert again.token_ids.tolist() == answer.token_ids.tolist()
    assert runner.program.decoder.length <= len(prompt) + len(again.token_ids)


def test_a_draft_longer_than_a_call_takes_is_trimmed(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    plain, drafted = Runner(exported, max_chunk=4), Runner(exported, max_chunk=4, draft_tokens=100)
    for frame in (3, 3):
        _, inputs, prompt = exported.observation(frame)
        one, two = plain.run(prompt, inputs, depth_codes=FORCED_DEPTH), drafted.run(prompt, inputs, depth_codes=FORCED_DEPTH)
        assert two.token_ids.tolist() == one.token_ids.tolist()
    assert two.decode_steps < one.decode_steps


def test_an_action_chunk_is_identical_too(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    runner = Runner(exported, n_actions=2, max_chunk=512)
    _, inputs, prompt = exported.observation(5)
    reference = exported.reference(prompt, inputs, runner.grammar, FORCED_DEPTH)
    result = runner.run(prompt, inputs, depth_codes=FORCED_DEPTH)
    assert result.token_ids.tolist() == reference and result.actions.shape == (2, 7)


def test_forcing_depth_and_trace_leaves_only_the_actions_to_decode(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    runner = Runner(exported)
    _, inputs, prompt = exported.observation(11)
    free = runner.run(prompt, inputs)
    depth = runner.run(prompt, inputs, depth_codes=FORCED_DEPTH)
    steered = runner.run(prompt, inputs, depth_codes=FORCED_DEPTH, trace=FORCED_TRACE)
    n_tokens = len(depth.token_ids)
    # The 100 depth codes are 100 sequential choices; forced, the whole answer costs under half its tokens.
    assert free.decode_steps >= 100 > depth.decode_steps
    assert depth.decode_steps < n_tokens / 2
    # Steered: everything up to the first action token is prefill; 7 action tokens need 6 more steps.
    assert steered.decode_steps == 6 and steered.trace_forced and steered.depth_forced
    np.testing.assert_array_equal(steered.trace, FORCED_TRACE)
    np.testing.assert_allclose(steered.trace_px, trace_to_pixels(np.array(FORCED_TRACE), *FRAME_PX))
    assert set(steered.stage_seconds) == {"prefill", "decode", "release", "parse"}


def test_median_action_decoding_picks_each_bins_median_under_the_reference_model(tmp_path_factory):
    import torch

    exported = exported_bundle(tmp_path_factory, "D")
    greedy, median = Runner(exported, n_actions=2), Runner(exported, n_actions=2, action_decoding="median")
    _, inputs, prompt = exported.observation(6)
    a, b = (r.run(prompt, inputs, depth_codes=FORCED_DEPTH) for r in (greedy, median))
    # Only action bins are decoded differently: the depth codes and the trace before them are the greedy ones.
    vb = exported.layout.base_vocab_size
    action_ids = np.arange(vb - 256, vb)
    positions = np.flatnonzero(np.isin(b.token_ids, action_ids))      # 2 actions x 7 bins, "," between actions
    assert b.token_ids[:positions[0]].tolist() == a.token_ids[:positions[0]].tolist()
    assert b.token_ids[positions].tolist() == b.answer.action_ids.reshape(-1).tolist() and len(positions) == 14
    # The full PyTorch model, teacher-forced on the median answer: each action token is the median of its
    # softmax over the 256 action ids.
    ids = np.concatenate([prompt, b.token_ids])
    tensors = [torch.from_numpy(np.array(x)) for x in (inputs.images, inputs.image_masks, inputs.pooled_patches_idx)]
    with torch.no_grad():
        logits = exported.model(torch.from_numpy(ids)[None], *tensors)[0].double().numpy()
    picked = []
    for position in len(prompt) + positions:
        p = np.exp(logits[position - 1, action_ids] - logits[position - 1, action_ids].max())
        picked.append(int(action_ids[np.searchsorted(np.cumsum(p) / p.sum(), 0.5)]))
    assert b.token_ids[positions].tolist() == picked
    assert a.answer.action_ids.reshape(-1).tolist() != picked      # this model's argmax and median differ here
    with pytest.raises(ConfigError, match="action_decoding 'mean' unknown; use one of greedy, median"):
        Runner(exported, action_decoding="mean")


def test_actions_are_bin_centres_unnormalized_with_the_bundle_statistics(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    runner = Runner(exported)
    _, inputs, prompt = exported.observation(4)
    result = runner.run(prompt, inputs, depth_codes=FORCED_DEPTH)
    vb = exported.layout.base_vocab_size
    bins = np.clip(vb - result.answer.action_ids - 1, 0, 254)
    np.testing.assert_allclose(result.actions_normalized, -1 + (2 * bins + 1) / 255)
    np.testing.assert_allclose(result.actions, unnormalize_actions(result.actions_normalized, runner.stats))
    assert result.actions[0, -1] == result.actions_normalized[0, -1]      # the gripper stays normalized


def test_mismatched_image_tokens_and_features_are_refused(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    runner = Runner(exported)
    _, inputs, prompt = exported.observation(4)
    with pytest.raises(EdgeactError, match=r"<im_patch> tokens for .* image features"):
        runner.program.run(prompt[prompt != exported.layout.im_patch_id], np.zeros((4, 64), np.float32),
                           inputs.pooled_patches_idx[:4])
    with pytest.raises(EdgeactError, match="prompt is empty"):
        runner.program.run([])


@pytest.mark.parametrize("tied, allowed", [(np.arange(15, 25), np.arange(15, 25)), (np.array([3, 17, 30]),
                                                                                      np.arange(10, 32))],
                         ids=["a digit set of equal rows", "scattered among others"])
def test_equal_head_rows_tie_to_the_lowest_id_as_the_reference(tied, allowed):
    """Ids whose LM-head rows are equal tie exactly; a matmul over the small sliced head rounded them apart by where
    they sat (the program picked id 23 where masked greedy decoding's full-vocabulary logits tie to 15)."""
    from edgeact.runtime.decode_program import _Head

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 64)).astype(np.float32)
    weight[tied] = weight[tied[-1]]
    head = _Head(weight, allowed)
    for _ in range(200):
        hidden = rng.standard_normal(64).astype(np.float32)
        picked = head.pick(hidden)
        best = allowed[np.argmax(weight[allowed].astype(np.float64) @ hidden.astype(np.float64))]
        assert picked == (tied[tied >= 10].min() if best in tied else best)
    assert head.median(hidden) in allowed and len(head.ids) == len(allowed)     # the median still sees every id
