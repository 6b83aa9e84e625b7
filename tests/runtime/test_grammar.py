"""Answer grammar: parsing the DESIGN.md answer, round trips text <-> ids <-> values, bin math, errors, structure."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgeact.export.tokenizer_build import build_tokenizer
from edgeact.runtime.action_bins import (
    ActionStats, action_ids_to_values, normalize_actions, unnormalize_actions, values_to_action_ids,
)
from edgeact.runtime.answer import Answer, pixels_to_trace, trace_to_pixels
from edgeact.runtime.errors import CheckpointError, GrammarError
from edgeact.runtime.grammar import Actions, AnswerGrammar, DepthCodes, End, Fixed, Trace
from edgeact.runtime.token_layout import TokenLayout

DEPTH = "".join(f"<DEPTH_{(7 * k) % 128}>" for k in range(100))
ACTIONS = "丂, 七, 丌, 乿, 亀, 亿, 丟"   # U+4E02 U+4E03 U+4E0C U+4E7F U+4E80 U+4EBF U+4E1F
DESIGN_ANSWER = (
    f"The depth map of the first image is <DEPTH_START>{DEPTH}<DEPTH_END>. The trajectory of the end effector in "
    "the first image is [[242, 115], [140, 77], [96, 60], [71, 58]]. Based on these information, along with other "
    "images from different camera views as additional information, the action that the robot should take is "
    f"[{ACTIONS}]."
)


@pytest.fixture(scope="module")
def grammar(tok, layout):
    return AnswerGrammar(tok, layout)


@pytest.fixture(scope="module")
def chunk_grammar(tok, layout):
    return AnswerGrammar(tok, layout, n_actions=8)


def test_design_example_parses(grammar, layout):
    answer = grammar.parse_text(DESIGN_ANSWER)
    assert answer.depth_codes.shape == (100,) and answer.depth_codes[:3].tolist() == [0, 7, 14]
    assert answer.trace.tolist() == [[242, 115], [140, 77], [96, 60], [71, 58]]
    vb = layout.base_vocab_size
    assert answer.action_ids.tolist() == [[vb - 256 + j for j in (0x02, 0x03, 0x0C, 0x7F, 0x80, 0xBF, 0x1F)]]
    # Action ids count down from Vb: the first action token (一 + j) is bin 255 - j.
    assert action_ids_to_values(answer.action_ids, vb)[0, 4] == 0.0        # U+4E80: j = 128 -> bin 127, centre 0
    assert grammar.to_text(answer) == DESIGN_ANSWER


def test_ids_are_the_tokenizers_encoding_of_the_answer(grammar, tok, layout):
    answer = grammar.parse_text(DESIGN_ANSWER)
    ids = grammar.to_ids(answer)
    assert ids.tolist() == tok.encode(" " + DESIGN_ANSWER, add_special_tokens=False).ids + [layout.bos_id]
    assert grammar.parse_ids(ids) == answer
    assert grammar.parse_ids(ids[:-1]) == answer                       # end-of-text is optional
    assert grammar.parse_text(tok.decode(ids.tolist())) == answer      # leading space and EOS drop out


def test_chunk_of_8_actions_round_trips(chunk_grammar, layout):
    rng = np.random.default_rng(3)
    values = rng.uniform(-1, 1, (8, 7))
    answer = Answer(rng.integers(0, 128, 100), [[0, 255], [10, 9], [100, 99], [255, 0], [5, 50]],
                    values_to_action_ids(values, layout.base_vocab_size))
    text = chunk_grammar.to_text(answer)
    assert text.endswith("]].") and text.count("], [") == 4 + 7   # trace points + actions
    assert chunk_grammar.parse_text(text) == answer
    assert chunk_grammar.parse_ids(chunk_grammar.to_ids(answer)) == answer
    decoded = action_ids_to_values(chunk_grammar.parse_text(text).action_ids, layout.base_vocab_size)
    assert np.abs(decoded - values).max() <= 1 / 255 + 1e-12      # half a bin of 2/255


def test_bin_math_by_hand(layout):
    vb = layout.base_vocab_size
    assert values_to_action_ids([-1.0, 0.0, 0.5, 1.0, 7.0], vb).tolist() == [vb - 1, vb - 128, vb - 192, vb - 256, vb - 256]
    # edges -1 + 2k/255; bin b's centre is -1 + (2b+1)/255.
    centres = action_ids_to_values([vb - 1, vb - 128, vb - 192, vb - 256], vb)
    np.testing.assert_allclose(centres, [-0.996078431372549, 0.0, 0.5019607843137255, 0.996078431372549], rtol=0, atol=1e-15)
    with pytest.raises(GrammarError, match="not an action token"):
        action_ids_to_values([vb], vb)
    # Decoding then encoding returns the same id, except for the top bin: 256 ids share 255 centres.
    ids = np.arange(vb - 256, vb)
    again = values_to_action_ids(action_ids_to_values(ids, vb), vb)
    assert np.array_equal(again[1:], ids[1:]) and again[0] == vb - 255


def test_unnormalization_by_hand():
    stats = ActionStats.from_norm_stats({"sim": {"action": {
        "q01": [-0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0], "q99": [1.5, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0],
        "mask": [True, False, True, True, True, True, True], "mean": [0.0] * 7}}}, "sim")
    # bin 127 (0.0), bin 0 (-1 + 1/255), bin 127, then 0.5 on the rest; gripper 0.5 stays 0.5.
    normalized = np.array([0.0, -0.996078431372549, 0.0, 0.5, 0.5, 0.5, 0.5])
    out = unnormalize_actions(normalized, stats)
    # 0.5*(0+1)*2 - 0.5 = 0.5; dim 1 masked off: unchanged; 0.5*(0+1)*2 + 0 = 1.0; 0.5*1.5*2 = 1.5.
    np.testing.assert_allclose(out, [0.5, -0.996078431372549, 1.0, 1.5, 1.5, 1.5, 0.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(unnormalize_actions(np.array([-0.996078431372549] * 7), stats)[0], -0.49607843137254903)
    np.testing.assert_allclose(normalize_actions(out, stats), normalized, atol=1e-12)


def test_unnorm_key_errors_list_the_keys():
    stats = {"bridge": {"action": {"q01": [0] * 7, "q99": [1] * 7}}, "libero": {"action": {"q01": [0] * 7, "q99": [1] * 7}}}
    with pytest.raises(CheckpointError, match="available keys: bridge, libero"):
        ActionStats.from_norm_stats(stats, "fractal")
    with pytest.raises(CheckpointError, match="choose an unnorm_key from: bridge, libero"):
        ActionStats.from_norm_stats(stats)
    only = ActionStats.from_norm_stats({"bridge": stats["bridge"]})
    assert only.mask.all()


@pytest.mark.parametrize("unnorm_key", [None, "bridge"])
def test_no_norm_stats_says_the_statistics_are_missing_and_where_they_come_from(unnorm_key):
    """Not 'choose an unnorm_key from: (none)': there is no key to choose."""
    with pytest.raises(CheckpointError, match=r"norm_stats is empty: the checkpoint's config\.json \(or the bundle's "
                                              r"manifest\) has no action statistics.*which training writes.*use a "
                                              r"checkpoint whose config\.json has norm_stats"):
        ActionStats.from_norm_stats({}, unnorm_key)


@pytest.mark.parametrize("action, message", [
    ({"q01": [0] * 6, "q99": [1] * 6}, "q01 and q99 need 7 values"),
    ({"q01": [1] * 7, "q99": [0] * 7}, r"q01 > q99 in dimensions \[0, 1, 2, 3, 4, 5, 6\]: swapped"),
    ({"q01": [0] * 7, "q99": [1] * 7, "mask": ["false"] * 7}, "mask must be 7 true / false values"),
])
def test_statistics_a_bundle_cannot_decode_with_are_refused(action, message):
    """Swapped q01 / q99 would flip the actions' signs, and np.asarray(["false"], bool) is True: refused at load."""
    with pytest.raises(CheckpointError, match=r"norm_stats\['sim'\]\['action'\]: " + message):
        ActionStats.from_norm_stats({"sim": {"action": action}}, "sim")


def test_trace_to_pixels_any_image_size():
    px = trace_to_pixels([[255, 0], [128, 128], [0, 255]], 640, 480)
    np.testing.assert_allclose(px, [[639.0, 0.0], [320.7529411764706, 240.4392156862745], [0.0, 479.0]])
    assert pixels_to_trace(px, 640, 480).tolist() == [[255, 0], [128, 128], [0, 255]]
    np.testing.assert_allclose(trace_to_pixels([[255, 255]], 256, 256), [[255.0, 255.0]])


@pytest.mark.parametrize("broken, expected", [
    (DESIGN_ANSWER.replace("<DEPTH_0>", "", 1), "depth code 100 of 100"),
    (DESIGN_ANSWER.replace("<DEPTH_7>", "<DEPTH_128>", 1), "depth code 2 of 100"),
    (DESIGN_ANSWER.replace("[71, 58]", "[71, 256]"), r"y of trace point 4 in \[0, 255\]"),
    (DESIGN_ANSWER.replace("[96, 60]", "[96, 060]"), "without leading zeros"),
    (DESIGN_ANSWER.replace("[71, 58]]", "[71, 58], [1, 2], [3, 4]]"), "at most 5 points"),
    (DESIGN_ANSWER.replace("[242, 115]", "[242 115]"), "', '"),
    (DESIGN_ANSWER.replace(", 丟]", "]"), "', ' before action token 7 of 7"),
    (DESIGN_ANSWER.replace("丌", "X"), "action token 3 of 7"),
    (DESIGN_ANSWER.replace("Based on", "Given"), "Based on"),
    (DESIGN_ANSWER + " Done.", "the end of the answer"),
    (DESIGN_ANSWER[:500], "depth code"),
])
def test_malformed_answers_raise_grammar_error(grammar, broken, expected):
    with pytest.raises(GrammarError, match=expected):
        grammar.parse_text(broken)


def test_error_names_the_text_position(grammar):
    broken = DESIGN_ANSWER.replace("[140, 77]", "[140, x7]")
    with pytest.raises(GrammarError) as err:
        grammar.parse_text("  " + broken)
    assert f"char {2 + broken.index('x7')}" in str(err.value) and "'x7]" in str(err.value)


def test_id_errors_name_the_index(grammar, layout):
    ids = grammar.to_ids(grammar.parse_text(DESIGN_ANSWER))
    bad = ids.copy()
    bad[40] = layout.action_ids[0]
    with pytest.raises(GrammarError, match="answer ids at index 40: expected depth code 31 of 100"):
        grammar.parse_ids(bad)


def test_wrong_chunk_size_is_refused(grammar, chunk_grammar):
    single = grammar.parse_text(DESIGN_ANSWER)
    with pytest.raises(GrammarError, match="this grammar writes 8"):
        chunk_grammar.to_text(single)
    with pytest.raises(GrammarError, match=r"'\], \[' before action 2 of 8"):
        chunk_grammar.parse_text(DESIGN_ANSWER.replace(f"[{ACTIONS}]", f"[[{ACTIONS}]]"))


def test_structure_describes_the_choices(grammar, layout):
    kinds = [type(s) for s in grammar.segments]
    assert kinds == [Fixed, DepthCodes, Fixed, Trace, Fixed, Actions, Fixed, End]
    depth, trace, actions, end = grammar.segments[1], grammar.segments[3], grammar.segments[5], grammar.segments[7]
    assert depth.n == 100 and list(depth.code_ids) == layout.depth_code_ids.tolist()
    assert list(trace.digit_ids) == layout.digit_ids.tolist() and trace.max_points == 5 and trace.max_value == 255
    assert trace.coord_sep.text == ", " and trace.point_sep.text == "], ["
    assert list(actions.action_ids) == layout.action_ids.tolist() and (actions.n_actions, actions.dims) == (1, 7)
    assert end.eos_id == layout.bos_id
    fixed = [s.piece for s in grammar.segments if isinstance(s, Fixed)]
    assert fixed[0].ids[-1] == layout.depth_start_id and fixed[1].ids[0] == layout.depth_end_id
    assert fixed[2].text.startswith("]]. Based on") and fixed[2].text.endswith("is [") and fixed[3].text == "]."
    # After a y-coordinate the decoder chooses among: a digit, the next point, or the close.
    firsts = {trace.point_sep.ids[0], fixed[2].ids[0], trace.coord_sep.ids[0], *trace.digit_ids}
    assert len(firsts) == 13


def test_tokenizer_merging_across_boundaries_is_refused(tok, layout):
    # A merge of the space with an action character makes ", 乿" one token fewer than the pieces say.
    data = json.loads(tok.to_str())
    space_action = "Ġ" + tok.id_to_token(int(layout.action_ids[127]))
    data["model"]["merges"].append(["Ġ", tok.id_to_token(int(layout.action_ids[127]))])
    data["model"]["vocab"][space_action] = max(data["model"]["vocab"].values()) + 1
    merged = Tokenizer.from_str(json.dumps(data))
    with pytest.raises(GrammarError, match="merges tokens across"):
        AnswerGrammar(merged, TokenLayout.from_tokenizer(merged))
