"""The MolmoAct answer grammar: its fixed sentences and closed choices, encoded and parsed as text and as token ids.

The answer (DESIGN.md), with N actions of 7 tokens each:

    The depth map of the first image is <DEPTH_START><DEPTH_k> x 100<DEPTH_END>. The trajectory of
    the end effector in the first image is [[x, y], [x, y], ...]. Based on these information, along
    with other images from different camera views as additional information, the action that the
    robot should take is [a, a, a, a, a, a, a].

- trace: 1..5 points, coordinates written in decimal without leading zeros, in [0, 256);
- actions: each `a` is the text of one action token (for edgeact's tokenizers a CJK character);
  a single action (N = 1) is one bracketed list `[a, ..., a]`; a chunk (N > 1) is a bracketed
  list of N such lists, `[[a, ..., a], [a, ..., a], ...]` -- the same nesting as the trace.

As token ids the answer is the continuation of the prompt (which ends in "Assistant:"), so
it starts with the tokens of " The" (with the space) and ends with the end-of-text id; the
text form has neither. The grammar is also a declarative description for a constrained
decoder (`AnswerGrammar.segments`): Fixed pieces to prefill, and closed token sets to choose
from. Every segment boundary is a pre-tokenizer boundary (digits are single tokens, special
and action tokens stand alone), which the constructor checks on a probe answer, so the ids of
the pieces concatenated equal the tokenizer's encoding of the whole answer text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from edgeact.runtime.action_bins import ACTION_DIMS, N_ACTION_BINS
from edgeact.runtime.answer import MAX_TRACE_POINTS, N_DEPTH_TOKENS, TRACE_RANGE, Answer
from edgeact.runtime.errors import GrammarError
from edgeact.runtime.token_layout import DEPTH_END, DEPTH_START, TokenLayout, depth_token

DEPTH_LEAD = "The depth map of the first image is "
TRACE_LEAD = ". The trajectory of the end effector in the first image is "
ACTION_LEAD = (". Based on these information, along with other images from different camera views as "
               "additional information, the action that the robot should take is ")
LIST_SEP = ", "           # between the two coordinates of a point, and between action tokens
NESTED_SEP = "], ["       # between trace points, and between the actions of a chunk
ANSWER_SPACE = " "        # the ids continue "Assistant:" with a space


@dataclass(frozen=True)
class Piece:
    """A fixed stretch of the answer, as text and as the token ids it always encodes to."""
    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Fixed:
    piece: Piece


@dataclass(frozen=True)
class DepthCodes:
    n: int                     # exactly this many codes
    code_ids: tuple[int, ...]  # code_ids[k] = id of <DEPTH_k>


@dataclass(frozen=True)
class Trace:
    """1..max_points points `x` coord_sep `y`, joined by point_sep; then the next Fixed piece.

    Token choices: a coordinate is 1..3 digit ids (value < 256, no leading zero); after a
    y-coordinate comes point_sep.ids[0] (another point) or the next Fixed piece's ids[0].
    """
    max_points: int
    max_value: int             # 255
    digit_ids: tuple[int, ...]  # digit_ids[d] = id of "d"
    coord_sep: Piece
    point_sep: Piece


@dataclass(frozen=True)
class Actions:
    """n_actions x dims action ids; token_sep between the tokens of an action, action_sep between actions."""
    n_actions: int
    dims: int
    action_ids: tuple[int, ...]  # the closed set: Vb-256 .. Vb-1
    token_sep: Piece
    action_sep: Piece


@dataclass(frozen=True)
class End:
    eos_id: int


Segment = Union[Fixed, DepthCodes, Trace, Actions, End]
_TEXT, _IDS = "text", "ids"


@dataclass(frozen=True)
class _Form:
    """The grammar's symbols in one form: text units (characters and whole tokens) or token ids."""
    depth: tuple          # depth[k]: <DEPTH_k>
    digits: tuple         # digits[d]: "d"
    actions: tuple        # actions[j]: action token j (id Vb-256+j)
    end: tuple            # what ends the answer (end-of-text id; nothing in text)
    piece: Callable[[Piece], tuple]


class AnswerGrammar:
    """The answer grammar for one tokenizer and chunk size; encodes and parses answers."""

    def __init__(self, tokenizer, layout: TokenLayout, n_actions: int = 1, max_trace_points: int = MAX_TRACE_POINTS):
        if n_actions < 1:
            raise GrammarError(f"n_actions is {n_actions}; use 1 (one action) or the chunk size, e.g. 8")
        if not 1 <= max_trace_points <= MAX_TRACE_POINTS:
            raise GrammarError(f"max_trace_points must be in 1..{MAX_TRACE_POINTS}, got {max_trace_points}")
        self.tokenizer, self.layout = tokenizer, layout
        self.n_actions, self.max_trace_points = n_actions, max_trace_points
        self.action_first_id = int(layout.action_ids[0])

        def piece(text: str, lead: str = "") -> Piece:
            return Piece(text, tuple(tokenizer.encode(lead + text, add_special_tokens=False).ids))

        opened, closed = ("[", "].") if n_actions == 1 else ("[[", "]].")
        self.segments: tuple[Segment, ...] = (
            Fixed(piece(DEPTH_LEAD + DEPTH_START, ANSWER_SPACE)),
            DepthCodes(N_DEPTH_TOKENS, tuple(int(i) for i in layout.depth_code_ids)),
            Fixed(piece(DEPTH_END + TRACE_LEAD + "[[")),
            Trace(max_trace_points, TRACE_RANGE - 1, tuple(int(i) for i in layout.digit_ids), piece(LIST_SEP), piece(NESTED_SEP)),
            Fixed(piece("]]" + ACTION_LEAD + opened)),
            Actions(n_actions, ACTION_DIMS, tuple(int(i) for i in layout.action_ids), piece(LIST_SEP), piece(NESTED_SEP)),
            Fixed(piece(closed)),
            End(layout.bos_id),   # <|endoftext|> ends generation as it begins the prompt
        )
        self.action_texts = self._action_texts()
        self._forms = {_IDS: self._ids_form()}
        if self.action_texts is not None:
            self._forms[_TEXT] = self._text_form()
        self._check_boundaries()

    # --- public API ------------------------------------------------------------------------

    def to_text(self, answer: Answer) -> str:
        return "".join(self._emit(answer, self._form(_TEXT)))

    def to_ids(self, answer: Answer, eos: bool = True) -> np.ndarray:
        ids = np.asarray(self._emit(answer, self._form(_IDS)), dtype=np.int64)
        return ids if eos else ids[:-1]

    def parse_text(self, text: str) -> Answer:
        body = text.strip()
        start = len(text) - len(text.lstrip())
        units, offsets = self._units(body)
        return self._parse(_Reader(units, [start + o for o in offsets], _TEXT, self), self._form(_TEXT))

    def parse_ids(self, ids) -> Answer:
        units = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._parse(_Reader(units, list(range(len(units) + 1)), _IDS, self), self._form(_IDS))

    # --- forms: the same grammar over text units (characters and whole tokens) or token ids ---

    def _action_texts(self) -> tuple[str, ...] | None:
        """The text of each action token, or None where they are not distinct stand-alone strings."""
        texts = tuple(self.tokenizer.decode([int(i)], skip_special_tokens=False) for i in self.layout.action_ids)
        clean = all(t and "\ufffd" not in t and not re.search(r"[\s\d\[\],<]", t) for t in texts)
        return texts if clean and len(set(texts)) == len(texts) else None

    def _ids_form(self) -> "_Form":
        return _Form(depth=tuple(int(i) for i in self.layout.depth_code_ids),
                     digits=tuple(int(i) for i in self.layout.digit_ids),
                     actions=tuple(int(i) for i in self.layout.action_ids),
                     end=(self.layout.bos_id,), piece=lambda p: p.ids)

    def _text_form(self) -> "_Form":
        actions = sorted(self.action_texts, key=len, reverse=True)
        self._unit_re = re.compile("|".join([r"<DEPTH_(?:START|END|\d+)>"] + [re.escape(a) for a in actions] + ["."]), re.DOTALL)
        return _Form(depth=tuple(depth_token(k) for k in range(len(self.layout.depth_code_ids))),
                     digits=tuple("0123456789"), actions=self.action_texts,
                     end=(), piece=lambda p: tuple(self._units(p.text)[0]))

    def _form(self, name: str) -> "_Form":
        if name not in self._forms:
            raise GrammarError("this tokenizer's action tokens do not decode to distinct printable strings, "
                               "so answers cannot be handled as text; use to_ids / parse_ids")
        return self._forms[name]

    def _units(self, text: str) -> tuple[list[str], list[int]]:
        units, offsets = [], []
        for m in self._unit_re.finditer(text):
            units.append(m.group())
            offsets.append(m.start())
        offsets.append(len(text))
        return units, offsets

    # --- encoding -------------------------------------------------------------------------------

    def _emit(self, answer: Answer, form: "_Form") -> list:
        self._check_answer(answer)
        out: list = []
        for seg in self.segments:
            if isinstance(seg, Fixed):
                out += form.piece(seg.piece)
            elif isinstance(seg, DepthCodes):
                out += [form.depth[c] for c in answer.depth_codes]
            elif isinstance(seg, Trace):
                for n, (x, y) in enumerate(answer.trace):
                    out += form.piece(seg.point_sep) if n else []
                    out += [form.digits[int(d)] for d in str(int(x))] + list(form.piece(seg.coord_sep))
                    out += [form.digits[int(d)] for d in str(int(y))]
            elif isinstance(seg, Actions):
                for a, row in enumerate(answer.action_ids):
                    out += form.piece(seg.action_sep) if a else []
                    for d, tid in enumerate(row):
                        out += form.piece(seg.token_sep) if d else []
                        out.append(form.actions[int(tid) - self.action_first_id])
            else:
                out += form.end
        return out

    def _check_answer(self, answer: Answer) -> None:
        if answer.action_ids.shape[0] != self.n_actions:
            raise GrammarError(f"answer has {answer.action_ids.shape[0]} actions, this grammar writes {self.n_actions}")
        if answer.trace.shape[0] > self.max_trace_points:
            raise GrammarError(f"answer has {answer.trace.shape[0]} trace points, this grammar allows {self.max_trace_points}")
        first = self.action_first_id
        if answer.action_ids.min() < first or answer.action_ids.max() >= first + N_ACTION_BINS:
            raise GrammarError(f"action ids must be action tokens {first} .. {first + N_ACTION_BINS - 1}")

    # --- parsing ----------------------------------------------------------------------------------

    def _parse(self, r: "_Reader", form: "_Form") -> Answer:
        depth_index = {u: k for k, u in enumerate(form.depth)}
        digit_index = {u: d for d, u in enumerate(form.digits)}
        action_index = {u: self.action_first_id + j for j, u in enumerate(form.actions)}
        depth = trace = actions = None
        for seg in self.segments:
            if isinstance(seg, Fixed):
                r.expect(form.piece(seg.piece), repr(seg.piece.text))
            elif isinstance(seg, DepthCodes):
                depth = [r.take(depth_index, f"depth code {k + 1} of {seg.n} (<DEPTH_0> .. <DEPTH_127>)") for k in range(seg.n)]
            elif isinstance(seg, Trace):
                trace = []
                while True:
                    x = r.number(digit_index, seg.max_value, f"x of trace point {len(trace) + 1}")
                    r.expect(form.piece(seg.coord_sep), repr(seg.coord_sep.text))
                    y = r.number(digit_index, seg.max_value, f"y of trace point {len(trace) + 1}")
                    trace.append((x, y))
                    sep = form.piece(seg.point_sep)
                    if not r.at(sep):
                        break
                    if len(trace) == seg.max_points:
                        r.fail(f"a trace has at most {seg.max_points} points")
                    r.expect(sep, repr(seg.point_sep.text))
            elif isinstance(seg, Actions):
                actions = []
                for a in range(seg.n_actions):
                    if a:
                        r.expect(form.piece(seg.action_sep), f"{seg.action_sep.text!r} before action {a + 1} of {seg.n_actions}")
                    row = []
                    for d in range(seg.dims):
                        if d:
                            r.expect(form.piece(seg.token_sep), f"{seg.token_sep.text!r} before action token {d + 1} of {seg.dims}")
                        row.append(r.take(action_index, f"action token {d + 1} of {seg.dims} (action {a + 1} of {seg.n_actions})"))
                    actions.append(row)
            elif r.at(form.end):
                r.expect(form.end, "end of text")
        r.finish()
        return Answer(np.array(depth), np.array(trace), np.array(actions))

    def _check_boundaries(self) -> None:
        """The pieces must tokenize alone as inside a whole answer, and trace choices must differ."""
        trace = next(s for s in self.segments if isinstance(s, Trace))
        after = self.segments[self.segments.index(trace) + 1]
        firsts = [trace.coord_sep.ids[0], trace.point_sep.ids[0], after.piece.ids[0]]
        if len(set(firsts) | set(trace.digit_ids)) != len(firsts) + len(trace.digit_ids):
            raise GrammarError("the tokenizer starts the trace separators ', ', '], [' and ']].' (or a digit) with the same token; "
                               "a decoder could not tell them apart")
        if _TEXT not in self._forms:
            return
        probe = Answer(np.arange(N_DEPTH_TOKENS) % 128, [[242, 115], [140, 77], [7, 0]][:self.max_trace_points],
                       np.resize(self.layout.action_ids[[0, 127, 128, 255, 3, 200, 64]], (self.n_actions, ACTION_DIMS)))
        whole = self.tokenizer.encode(ANSWER_SPACE + self.to_text(probe), add_special_tokens=False).ids
        if list(whole) != list(self.to_ids(probe, eos=False)):
            raise GrammarError("this tokenizer merges tokens across the answer grammar's boundaries (digits, separators, "
                               "action or depth tokens), so pieces encoded alone differ from the whole answer; "
                               "use a tokenizer with Qwen2's pre-tokenizer (single-digit tokens)")


class _Reader:
    """A cursor over units (token ids or text units) that raises GrammarError with the position."""

    def __init__(self, units: list, offsets: list[int], form: str, grammar: AnswerGrammar):
        self.units, self.offsets, self.form, self.grammar = units, offsets, form, grammar
        self.i = 0

    def fail(self, expected: str) -> None:
        where = f"answer text at char {self.offsets[self.i]}" if self.form == _TEXT else f"answer ids at index {self.i}"
        if self.i >= len(self.units):
            found = "the end"
        elif self.form == _TEXT:
            found = repr("".join(self.units[self.i:self.i + 6]))
        else:
            tid = self.units[self.i]
            found = f"id {tid} ({self.grammar.tokenizer.id_to_token(tid)!r})"
        raise GrammarError(f"{where}: expected {expected}, found {found}")

    def at(self, seq) -> bool:
        return tuple(self.units[self.i:self.i + len(seq)]) == tuple(seq)

    def expect(self, seq, what: str) -> None:
        for k, unit in enumerate(seq):
            if self.i >= len(self.units) or self.units[self.i] != unit:
                self.fail(what if k == 0 else f"{what} (it stops after {k} of {len(seq)} tokens/characters)")
            self.i += 1

    def take(self, table: dict, what: str):
        if self.i >= len(self.units) or self.units[self.i] not in table:
            self.fail(what)
        self.i += 1
        return table[self.units[self.i - 1]]

    def number(self, digits: dict, max_value: int, what: str) -> int:
        start, value = self.i, 0
        while self.i < len(self.units) and self.units[self.i] in digits:
            value = value * 10 + digits[self.units[self.i]]
            self.i += 1
        n = self.i - start
        if n == 0:
            self.fail(f"{what} (digits)")
        self.i = start   # report problems at the number's first digit
        if n > 1 and digits[self.units[start]] == 0:
            self.fail(f"{what} without leading zeros")
        if value > max_value:
            self.fail(f"{what} in [0, {max_value}]")
        self.i = start + n
        return value

    def finish(self) -> None:
        if self.i != len(self.units):
            self.fail("the end of the answer")
