"""The grammar walk: every path it allows is a valid answer, forcing works, and the masked reference follows it."""
import numpy as np
import pytest

from edgeact.runtime.answer import Answer
from edgeact.runtime.errors import GrammarError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.grammar_walk import (Choice, Forced, MaskedGreedyConstraint, answer_steps, longest_answer,
                                         trace_points)


def walk(grammar, pick, **force):
    """Run the walk choosing with pick(choice_ids) -> id; return ids and the kinds of choices made."""
    ids, kinds = [], []
    steps = answer_steps(grammar, **force)
    step = next(steps)
    while True:
        if isinstance(step, Forced):
            ids += step.ids
            step = next(steps, None)
        else:
            chosen = pick(step.ids)
            assert chosen in step.ids
            ids.append(chosen)
            kinds.append(step.kind)
            try:
                step = steps.send(chosen)
            except StopIteration:
                step = None
        if step is None:
            return ids, kinds


@pytest.mark.parametrize("n_actions", [1, 8])
def test_random_walks_always_produce_answers_that_parse(tok, layout, n_actions):
    grammar = AnswerGrammar(tok, layout, n_actions=n_actions)
    rng = np.random.default_rng(0)
    n_points_seen = set()
    for _ in range(60):
        ids, kinds = walk(grammar, lambda c: int(rng.choice(c)))
        answer = grammar.parse_ids(ids)
        assert list(grammar.to_ids(answer)) == ids  # one canonical encoding: the walk emits exactly it
        assert answer.action_ids.shape == (n_actions, 7)
        assert kinds.count("depth") == 100 and kinds.count("action") == 7 * n_actions
        n_points_seen.add(len(answer.trace))
        assert ((answer.trace >= 0) & (answer.trace < 256)).all()
    assert len(n_points_seen) > 1  # the walk really lets the trace length vary


def test_every_coordinate_value_can_be_written_and_nothing_else(tok, layout):
    """Drive the first x coordinate digit by digit: exactly the values 0..255 are reachable."""
    grammar = AnswerGrammar(tok, layout)
    digits = {int(t): d for d, t in enumerate(layout.digit_ids)}
    reachable = set()
    for target in range(0, 1000):
        text = str(target)
        steps = answer_steps(grammar, depth_codes=[0] * 100)
        step = next(steps)
        while isinstance(step, Forced):
            step = next(steps)
        ok = True
        for ch in text:
            tid = int(layout.digit_ids[int(ch)])
            if tid not in step.ids:
                ok = False
                break
            step = steps.send(tid)
        if ok and isinstance(step, Choice) and not set(step.ids.tolist()) <= set(digits):
            reachable.add(target)  # a separator may follow: the number is complete
    assert reachable == set(range(256))


def test_forced_depth_and_trace_come_through_exactly(tok, layout):
    grammar = AnswerGrammar(tok, layout)
    codes = [(3 * k) % 128 for k in range(100)]
    trace = [[0, 255], [17, 9], [200, 100]]
    ids, kinds = walk(grammar, lambda c: int(c[0]), depth_codes=codes, trace=trace)
    answer = grammar.parse_ids(ids)
    assert answer.depth_codes.tolist() == codes
    assert answer.trace.tolist() == trace
    assert set(kinds) == {"action"} and len(kinds) == 7  # only the actions are decided


@pytest.mark.parametrize("bad", [dict(depth_codes=[0] * 99), dict(depth_codes=[128] * 100),
                                 dict(trace=[]), dict(trace=[[0, 256]]), dict(trace=[[1, 1]] * 6)])
def test_bad_forced_values_are_refused(tok, layout, bad):
    with pytest.raises(GrammarError):
        list(answer_steps(AnswerGrammar(tok, layout), **bad))  # choices ignore a None reply


@pytest.mark.parametrize("trace, message", [
    ([[10, 20, 30], [40, 50, 60]], r"1\.\.5 points \[x, y\], an \(n, 2\) array; got \(2, 3\)"),   # 3-D points
    ([10, 20, 30, 40], r"an \(n, 2\) array; got \(4,\)"),                                          # a flat list
    ([[1, 2], [3]], r"got a ragged sequence"),
    ([[1, 1]] * 6, r"1\.\.5 points.*got \(6, 2\)"),
    ([[12.9, 200.99]], r"integer coordinates.*\[\[12\.9, 200\.99\]\]; round them first"),          # not truncated
    ([[np.nan, 1.0]], r"integer coordinates"),
    ([["1", "2"]], r"integer coordinates"),
    ([[320, 240]], r"in \[0, 256\) \(the trace grid, not pixels: convert with .*pixels_to_trace\); got "
                   r"\[\[320, 240\]\]"),
    ([[-1, 0]], r"in \[0, 256\)"),
])
def test_a_malformed_trace_is_refused_naming_it(trace, message):
    with pytest.raises(GrammarError, match=r"^steer\(\) needs .*" + message):
        trace_points(trace, what="steer()")


def test_a_trace_of_integers_or_integral_floats_is_taken_as_is():
    assert trace_points([[12.0, 200.0], [0, 255]]).tolist() == [[12, 200], [0, 255]]
    assert trace_points(np.array([[3, 4]], np.uint8)).dtype == np.int64
    with pytest.raises(GrammarError, match=r"1\.\.2 points"):
        trace_points([[1, 1]] * 3, max_points=2)


@pytest.mark.parametrize("n_actions", [1, 8])
def test_longest_answer_counts_the_ids_of_the_longest_answer(tok, layout, n_actions):
    grammar = AnswerGrammar(tok, layout, n_actions=n_actions)
    actions = np.resize(layout.action_ids, (n_actions, 7))
    longest = Answer(np.zeros(100, np.int64), [[255, 255]] * 5, actions)
    assert longest_answer(grammar) == len(grammar.to_ids(longest))          # end-of-text included
    for trace in ([[1, 1]], [[0, 255], [17, 9], [200, 100]]):              # forced: exactly that trace's length
        assert longest_answer(grammar, trace) == len(grammar.to_ids(Answer(np.zeros(100, np.int64), trace, actions)))
    rng = np.random.default_rng(0)                                          # no walk is longer
    assert max(len(walk(grammar, lambda c: int(rng.choice(c)))[0]) for _ in range(30)) <= longest_answer(grammar)


def test_masked_greedy_constraint_follows_the_walk_and_refuses_off_grammar_tokens(tok, layout):
    grammar = AnswerGrammar(tok, layout)
    expected = grammar.to_ids(Answer(np.arange(100) % 128, np.array([[1, 2], [30, 40]]),
                                     layout.action_ids[:7].reshape(1, 7)))
    constraint = MaskedGreedyConstraint(grammar)
    for step, token in enumerate(expected):
        allowed = constraint(step, list(expected[:step]))
        assert token in allowed
    bad = MaskedGreedyConstraint(grammar)
    first = bad(0, [])
    with pytest.raises(GrammarError):
        bad(1, [int(first[0]) + 1])


def test_reference_masked_greedy_generation_yields_a_parseable_answer(tok, layout):
    torch = pytest.importorskip("torch")
    from edgeact.export.generate import generate_greedy
    from edgeact.export.synthetic import synthetic_config, synthetic_preprocess_config, synthetic_tensors
    from edgeact.export.model import MolmoActModel
    from edgeact.runtime.preprocess import ImagePreprocessor
    from edgeact.runtime.prompt import build_prompt_ids

    cfg = synthetic_config("D", "tiny", tok)
    model = MolmoActModel(cfg).eval()
    model.load_state_dict(synthetic_tensors(cfg, seed=3))
    rgb = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    inputs = ImagePreprocessor(cfg, synthetic_preprocess_config(cfg))(rgb)
    ids = build_prompt_ids(tok, layout, "move to the red block", inputs)
    grammar = AnswerGrammar(tok, layout)
    t = lambda a: torch.tensor(np.array(a))  # noqa: E731
    result = generate_greedy(model, t(ids)[None], t(inputs.images), t(inputs.image_masks), t(inputs.pooled_patches_idx),
                             max_new_tokens=400, eos_token_id=layout.bos_id,
                             allowed_token_fn=MaskedGreedyConstraint(grammar))
    answer = grammar.parse_ids(result.token_ids)
    assert answer.depth_codes.shape == (100,) and answer.action_ids.shape == (1, 7)


@pytest.mark.parametrize("codes, shown", [(np.full(100, 3.7), "3.7"), (np.full(100, np.nan), "nan"),
                                          (np.ones(100, bool), "True")])
def test_forced_depth_codes_that_are_not_integers_are_refused_not_truncated(codes, shown):
    from edgeact.runtime.grammar_walk import depth_code_values

    with pytest.raises(GrammarError, match=f"forced depth codes must be integers .* such as \\[{shown}"):
        depth_code_values(codes)
    assert depth_code_values(np.full(100, 7.0)).tolist() == [7] * 100      # integral floats are codes
