"""Walk the answer grammar token by token: forced runs and closed choices, for constrained decoding.

`answer_steps` is the one definition of what may follow at every point of an answer. Two
consumers drive it: `MaskedGreedyConstraint` (the reference: full-model greedy decoding, one
token per step, with every other token masked) and the runtime's decode program (forced runs
as multi-token prefill chunks, choices from logits of the allowed ids only). Because both walk
the same generator, their token sequences can be compared one for one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np

from edgeact.runtime.answer import MAX_TRACE_POINTS, N_DEPTH_CODES, N_DEPTH_TOKENS, TRACE_RANGE
from edgeact.runtime.errors import GrammarError
from edgeact.runtime.grammar import Actions, AnswerGrammar, DepthCodes, End, Fixed, Trace


@dataclass(frozen=True)
class Forced:
    """Tokens that must come next, in order (fed to the model without choosing)."""
    ids: tuple[int, ...]
    kind: str                  # "text", "depth", "trace", "end"


@dataclass(frozen=True)
class Choice:
    """One token to choose from a closed set (sorted ids)."""
    ids: np.ndarray
    kind: str                  # "depth", "trace", "action"


Step = Forced | Choice


def answer_steps(grammar: AnswerGrammar, depth_codes: Sequence[int] | None = None,
                 trace: Sequence[Sequence[int]] | None = None) -> Generator[Step, int | None, None]:
    """Yield the steps of one answer; send the chosen id after each Choice (None after Forced).

    depth_codes: force these 100 codes (e.g. from the depth sensor's tokenizer) instead of choosing.
    trace: force these points [[x, y], ...] (a user-edited plan); only the actions are then chosen.
    """
    segments = grammar.segments
    skip_first = False  # a trace ends by choosing the first token of the next fixed piece
    for i, seg in enumerate(segments):
        if isinstance(seg, Fixed):
            ids = seg.piece.ids[1:] if skip_first else seg.piece.ids
            skip_first = False
            if ids:
                yield Forced(tuple(ids), "text")
        elif isinstance(seg, DepthCodes):
            if depth_codes is not None:
                yield Forced(_forced_depth(seg, depth_codes), "depth")
            else:
                choices = np.array(sorted(seg.code_ids), dtype=np.int64)
                for _ in range(seg.n):
                    yield Choice(choices, "depth")
        elif isinstance(seg, Trace):
            after = segments[i + 1]
            if not isinstance(after, Fixed):
                raise GrammarError("a trace must be followed by a fixed piece of the answer")
            if trace is not None:
                yield Forced(_forced_trace(seg, trace), "trace")
            else:
                yield from _choose_trace(seg, after.piece.ids[0])
                skip_first = True
        elif isinstance(seg, Actions):
            choices = np.array(sorted(seg.action_ids), dtype=np.int64)
            for a in range(seg.n_actions):
                if a:
                    yield Forced(seg.action_sep.ids, "text")
                for d in range(seg.dims):
                    if d:
                        yield Forced(seg.token_sep.ids, "text")
                    yield Choice(choices, "action")
        elif isinstance(seg, End):
            yield Forced((seg.eos_id,), "end")


def _choose_trace(seg: Trace, closing_id: int) -> Generator[Step, int | None, None]:
    """1..max_points points of two decimal coordinates in [0, max_value], no leading zeros."""
    digit_value = {tid: d for d, tid in enumerate(seg.digit_ids)}
    for point in range(seg.max_points):
        for coord in (0, 1):
            if coord == 0:
                enders = (seg.coord_sep.ids[0],)
            elif point + 1 < seg.max_points:
                enders = (seg.point_sep.ids[0], closing_id)
            else:
                enders = (closing_id,)
            value, n_digits = 0, 0
            while True:
                allowed = [enders] if n_digits else []
                if n_digits == 0:
                    allowed.append(seg.digit_ids)
                elif value != 0 and n_digits < 3:  # no leading zero; at most 3 digits
                    allowed.append([tid for d, tid in enumerate(seg.digit_ids) if value * 10 + d <= seg.max_value])
                chosen = yield Choice(np.array(sorted(set().union(*allowed)), dtype=np.int64), "trace")
                if chosen in digit_value and chosen not in enders:
                    value, n_digits = value * 10 + digit_value[chosen], n_digits + 1
                    continue
                break
            if chosen == seg.coord_sep.ids[0] and coord == 0:
                if seg.coord_sep.ids[1:]:
                    yield Forced(seg.coord_sep.ids[1:], "trace")
            elif chosen == seg.point_sep.ids[0]:
                if seg.point_sep.ids[1:]:
                    yield Forced(seg.point_sep.ids[1:], "trace")
            else:
                return  # the closing piece's first token: the trace is complete


def depth_code_values(depth_codes) -> np.ndarray:
    """Forced depth codes as int64, refusing what is not integers (NaN, 3.7, True) rather than truncating it, and
    shapes other than a flat list or the tokenizer's square grid (a (2, 50) array is not 100 codes in order)."""
    raw = np.asarray(depth_codes)
    side = int(round(N_DEPTH_TOKENS ** 0.5))
    if raw.ndim not in (1, 2) or (raw.ndim == 2 and raw.shape != (side, side)):
        raise GrammarError(f"forced depth codes must be a flat sequence of {N_DEPTH_TOKENS} or a {side}x{side} grid; "
                           f"got shape {raw.shape}")
    codes = raw.reshape(-1)
    integral = codes.dtype.kind in "iu" or (codes.dtype.kind == "f" and np.isfinite(codes).all()
                                             and (codes == np.rint(codes)).all())
    if not integral:
        raise GrammarError(f"forced depth codes must be integers (the depth tokenizer's code indices); got "
                           f"{codes.dtype} values such as {codes[:5].tolist()}")
    return codes.astype(np.int64)


def forced_depth_codes(depth_codes) -> np.ndarray:
    """Forced depth codes checked as the answer needs them: N_DEPTH_TOKENS integers in [0, N_DEPTH_CODES)."""
    codes = depth_code_values(depth_codes)
    if codes.size != N_DEPTH_TOKENS or codes.min(initial=0) < 0 or codes.max(initial=0) >= N_DEPTH_CODES:
        raise GrammarError(f"forced depth needs {N_DEPTH_TOKENS} codes in [0, {N_DEPTH_CODES}), got {codes.size} codes "
                           f"in [{codes.min(initial=0)}, {codes.max(initial=0)}]")
    return codes


def _forced_depth(seg: DepthCodes, depth_codes: Sequence[int]) -> tuple[int, ...]:
    codes = depth_code_values(depth_codes)
    if codes.size != seg.n or codes.min(initial=0) < 0 or codes.max(initial=0) >= len(seg.code_ids):
        raise GrammarError(f"forced depth needs {N_DEPTH_TOKENS} codes in [0, {len(seg.code_ids)}), "
                           f"got {codes.size} codes in [{codes.min(initial=0)}, {codes.max(initial=0)}]")
    return tuple(seg.code_ids[int(c)] for c in codes)


def trace_points(trace, max_points: int = MAX_TRACE_POINTS, what: str = "a forced trace") -> np.ndarray:
    """`trace` as (n, 2) int64 points [x, y], 1 <= n <= max_points, integers (integral floats too) in [0, 256).

    GrammarError naming the value otherwise: nothing is reshaped, truncated or clipped into a different trace.
    """
    try:
        points = np.asarray(trace)
    except ValueError:      # ragged: points of different lengths
        points = None
    if points is None or points.ndim != 2 or points.shape[1:] != (2,) or not 1 <= len(points) <= max_points:
        raise GrammarError(f"{what} needs 1..{max_points} points [x, y], an (n, 2) array; got "
                           f"{getattr(points, 'shape', 'a ragged sequence')}: {trace!r}")
    if points.dtype.kind not in "iuf" or (points.dtype.kind == "f" and not (np.isfinite(points).all()
                                                                            and (points == np.rint(points)).all())):
        raise GrammarError(f"{what} needs integer coordinates on the {TRACE_RANGE}x{TRACE_RANGE} trace grid; got "
                           f"{points.tolist()}; round them first (pixels: edgeact.runtime.answer.pixels_to_trace)")
    if points.min() < 0 or points.max() >= TRACE_RANGE:
        raise GrammarError(f"{what} needs coordinates in [0, {TRACE_RANGE}) (the trace grid, not pixels: convert "
                           f"with edgeact.runtime.answer.pixels_to_trace); got {points.tolist()}")
    return points.astype(np.int64)


def _forced_trace(seg: Trace, trace: Sequence[Sequence[int]]) -> tuple[int, ...]:
    points = trace_points(trace, seg.max_points)
    ids: list[int] = []
    for k, (x, y) in enumerate(points):
        if k:
            ids += seg.point_sep.ids
        ids += [seg.digit_ids[int(c)] for c in str(int(x))]
        ids += seg.coord_sep.ids
        ids += [seg.digit_ids[int(c)] for c in str(int(y))]
    return tuple(ids)


def longest_answer(grammar: AnswerGrammar, trace: Sequence[Sequence[int]] | None = None) -> int:
    """The most ids an answer can have, end-of-text included: every point of the trace with 3-digit coordinates,
    or, forced, `trace`'s own length. Forced depth codes are as many as chosen ones."""
    n = 0
    for seg in grammar.segments:
        if isinstance(seg, Fixed):
            n += len(seg.piece.ids)
        elif isinstance(seg, DepthCodes):
            n += seg.n
        elif isinstance(seg, Trace):
            if trace is not None:
                n += len(_forced_trace(seg, trace))
            else:
                point = 2 * len(str(seg.max_value)) + len(seg.coord_sep.ids)     # x, y: 3 digits each
                n += seg.max_points * point + (seg.max_points - 1) * len(seg.point_sep.ids)
        elif isinstance(seg, Actions):
            action = seg.dims + (seg.dims - 1) * len(seg.token_sep.ids)
            n += seg.n_actions * action + (seg.n_actions - 1) * len(seg.action_sep.ids)
        elif isinstance(seg, End):
            n += 1
    return n


class MaskedGreedyConstraint:
    """`allowed_token_fn` for the reference's greedy generation: one grammar step per token."""

    def __init__(self, grammar: AnswerGrammar, depth_codes=None, trace=None):
        self._steps = answer_steps(grammar, depth_codes=depth_codes, trace=trace)
        self._step: Step | None = next(self._steps)
        self._pos = 0

    def __call__(self, step: int, generated: Sequence[int]) -> Sequence[int] | None:
        if step > 0:
            self._consume(int(generated[-1]))
        if self._step is None:
            return None
        if isinstance(self._step, Forced):
            return (self._step.ids[self._pos],)
        return self._step.ids

    def _consume(self, token: int) -> None:
        current = self._step
        if current is None:
            return
        if isinstance(current, Forced):
            if token != current.ids[self._pos]:
                raise GrammarError(f"token {token} generated where the grammar forces {current.ids[self._pos]}")
            self._pos += 1
            if self._pos < len(current.ids):
                return
            self._step = next(self._steps, None)
        else:
            if token not in set(current.ids.tolist()):
                raise GrammarError(f"token {token} is not among the {len(current.ids)} allowed {current.kind} tokens")
            try:
                self._step = self._steps.send(token)
            except StopIteration:
                self._step = None
        self._pos = 0
