"""The decode program's guards, on a stand-in decoder (no bundle): non-finite hidden states are refused, and a prompt
the longest answer would overflow is refused before the prefill."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgeact.runtime.decode_program import DecodeProgram, NonFiniteOutputError
from edgeact.runtime.errors import BundleError, SequenceTooLongError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.grammar_walk import longest_answer

WIDTH = 16
LONGEST_TRACE = [[255, 255]] * 5


class StandInDecoder:
    """A DecoderEngine's interface over random hidden states; call `bad_call` (from 1) returns `bad_value`."""

    def __init__(self, max_seq: int, max_chunk: int = 64, bad_call: int | None = None, bad_value: float = np.nan):
        self.layout = SimpleNamespace(hidden_size=WIDTH, max_seq=max_seq)
        self.max_chunk, self.embeds = max_chunk, np.zeros((max_chunk, WIDTH), np.float32)
        self.bad_call, self.bad_value = bad_call, bad_value
        self.calls = self.length = 0
        self._rng = np.random.default_rng(0)

    def reset(self) -> None:
        self.length = 0

    def step(self, n: int) -> np.ndarray:
        self.calls += 1
        self.length += n
        assert self.length <= self.layout.max_seq
        hidden = self._rng.standard_normal(WIDTH).astype(np.float32)
        if self.calls == self.bad_call:
            hidden[3] = self.bad_value
        return hidden

    def release(self) -> None:
        pass


def program(tok, layout, decoder: StandInDecoder, n_actions: int = 1) -> DecodeProgram:
    grammar = AnswerGrammar(tok, layout, n_actions=n_actions)
    rng = np.random.default_rng(1)
    vocab = tok.get_vocab_size()
    weights = [rng.standard_normal((vocab, WIDTH)).astype(np.float32) for _ in range(2)]
    return DecodeProgram(decoder, *weights, grammar, image_patch_id=-1)


def prompt(n: int) -> np.ndarray:
    return np.full(n, 7, np.int64)


@pytest.mark.parametrize("bad_call, stage", [(1, "prefill"), (2, "decode"), (40, "decode")])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_non_finite_hidden_state_is_refused_naming_the_stage(tok, layout, bad_call, stage, bad_value):
    decoder = StandInDecoder(512, bad_call=bad_call, bad_value=bad_value)
    with pytest.raises(NonFiniteOutputError, match=rf"decoder stage \({stage}, position \d+\): the engine produced "
                                                   r"non-finite values .*fp16 overflow.*fp32 bundle") as err:
        program(tok, layout, decoder).run(prompt(40))
    assert isinstance(err.value, BundleError) and decoder.calls == bad_call     # refused at once, nothing chosen


def test_finite_hidden_states_decode_as_before(tok, layout):
    result = program(tok, layout, StandInDecoder(512)).run(prompt(40))
    assert result.actions.shape == (1, 7) and np.isfinite(result.actions).all()


def test_the_decoders_release_is_timed_apart_from_the_decode_steps(tok, layout):
    # release() (e.g. onnxruntime's arena shrink: one more run) is no decode step: decode seconds / steps is a step.
    import time

    decoder = StandInDecoder(512)
    decoder.release = lambda: time.sleep(0.2)
    result = program(tok, layout, decoder).run(prompt(40))
    assert result.stage_seconds["release"] >= 0.2 > result.stage_seconds["decode"]


@pytest.mark.parametrize("n_actions", [1, 8])
def test_a_prompt_the_longest_answer_would_overflow_is_refused_before_the_prefill(tok, layout, n_actions):
    longest = longest_answer(AnswerGrammar(tok, layout, n_actions=n_actions))
    decoder = StandInDecoder(max_seq=40 + longest - 1)
    message = (rf"the prompt's 40 tokens plus the longest answer's {longest} need {40 + longest} positions, more "
               rf"than the bundle's max_seq {39 + longest}; shorten the instruction by at least 1 token or re-export "
               r"with a larger --max-seq")
    decode = program(tok, layout, decoder, n_actions)
    with pytest.raises(SequenceTooLongError, match=message):
        decode.run(prompt(40), trace=LONGEST_TRACE)       # an answer that would overflow at its last token
    with pytest.raises(SequenceTooLongError, match=message):
        decode.run(prompt(40))                            # whatever the model would write
    assert decoder.calls == 0                             # no prefill: refused before any work
    # A shorter forced trace shortens the longest answer: the same prompt fits.
    assert decode.run(prompt(40), trace=[[1, 1]]).trace.tolist() == [[1, 1]]


def test_the_longest_answer_fits_exactly(tok, layout):
    longest = longest_answer(AnswerGrammar(tok, layout, n_actions=8))
    decoder = StandInDecoder(max_seq=40 + longest)
    result = program(tok, layout, decoder, n_actions=8).run(prompt(40), trace=LONGEST_TRACE)
    assert len(result.token_ids) == longest and result.answer.trace.tolist() == LONGEST_TRACE
