"""The decode program: an answer decoded as forced chunks and closed choices, token-identical to masked greedy decoding.

It walks `grammar_walk.answer_steps`, the one definition of the answer's constraints:

- tokens the grammar forces (the fixed sentences, forced depth codes, a forced trace) are
  not generated one by one: they are queued, and everything queued is fed to the decoder as
  ONE chunk when a choice next needs the hidden state of the last queued token; the prompt
  and the answer's leading forced run go out together as the prefill (split into chunks of
  at most `max_chunk` positions);
- at a choice, logits are computed for the allowed ids only, with an LM head sliced per
  choice set once and cached (depth codes, digits and separators, action bins); the greedy
  pick is the argmax, ties to the lowest id as export/generate.py's masked_argmax; a set of
  one id needs no logits at all; the chosen token is queued like a forced one (with
  action_decoding="median", action bins are the distribution's median instead: not greedy);
- the answer's last tokens (after the last choice) are never fed: nothing follows them;
- drafting (`draft_tokens` > 0): a robot's consecutive frames differ little, and so do their
  answers; and the actions of one chunk differ little from one another. Each decoder call then
  also feeds up to `draft_tokens` drafted tokens after the queued ones: from the second action of
  the chunk on, the action before it in this answer; elsewhere the previous answer's tokens
  (aligned by position, and by the first action bin from there on). Every
  token is still decided as above, from the hidden state of its predecessor; a drafted token
  that equals the decision saves that decision its own call, and at the first one that differs
  the cache is rewound to it. So the tokens are the same with or without a draft (up to the
  float rounding of a longer chunk), only the number of calls changes. The draft length halves
  (down to 1) after a call whose first drafted token was wrong, doubles back after one whose every
  drafted token held, and is whole again where the action bins begin.

So a model invocation happens at most once per real choice instead of once per token. Where the
time goes: the decoder steps (one per choice after the prefill, fewer with drafting); the sliced LM head is a
(k x D) product with k <= 256; the grammar walk and buffer bookkeeping are microseconds.
Buffers (token sequence, embeddings, logits per choice set) are allocated at load.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edgeact.runtime.action_bins import ActionStats, action_ids_to_values, unnormalize_actions
from edgeact.runtime.answer import Answer, trace_to_pixels
from edgeact.runtime.engines import DecoderEngine
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError, SequenceTooLongError
from edgeact.runtime.grammar import Actions, AnswerGrammar, DepthCodes
from edgeact.runtime.grammar_walk import Forced, answer_steps, longest_answer

STAGES = ("preprocess", "vision", "prefill", "decode", "release", "parse")
# How an action bin is chosen: "greedy" (the argmax; token-identical to masked greedy decoding, as MolmoAct
# decodes) or "median" (the bin where the distribution's cumulative probability reaches one half). A small model's
# distribution over 256 bins is flat with its largest mass in an end bin (where the clipped tails land), so the
# argmax often commands full speed; the median follows the bulk. Reference ARM, fp32 with forced depth, 100
# lockstep episodes: 14 % greedy, 26 % median (README, "The reference task and its evaluation").
ACTION_DECODINGS = ("greedy", "median")
# Drafted tokens per decoder call where a robot config leaves it unset (BundlePolicyConfig.draft_tokens): most of
# one action of the answer (7 bins and their separators, 19 tokens with the project's tokenizers); the length
# adapts within each answer (README "Drafting from the previous answer": 4, 8 and 16 measured).
DEFAULT_DRAFT_TOKENS = 16


class NonFiniteOutputError(BundleError):
    """The decoder engine gave a hidden state with NaN or inf: every choice made from it would be garbage."""


@dataclass(frozen=True, eq=False)
class DecodeResult:
    """One decoded answer with its actions in both forms, and what producing it cost."""
    answer: Answer
    token_ids: np.ndarray              # (n,) the answer's ids, end-of-text included (as generate_greedy returns them)
    actions_normalized: np.ndarray     # (n_actions, 7) bin centres in [-1, 1]
    actions: np.ndarray                # (n_actions, 7) un-normalized with the bundle's statistics (gripper stays normalized)
    trace_px: np.ndarray | None        # (n_points, 2) [u, v] pixels of the first image, when its size is known
    prompt_tokens: int
    decode_steps: int                  # decoder invocations after the prefill (prompt + the answer's leading forced run)
    choices: int                       # answer tokens chosen from more than one id (the first from the prefill);
                                       # without drafting decode_steps == choices - 1, unless a forced run
                                       # between two choices is longer than the decoder's chunk
    depth_forced: bool
    trace_forced: bool
    stage_seconds: dict[str, float] = field(default_factory=dict)   # keys from STAGES

    @property
    def depth_codes(self) -> np.ndarray:
        return self.answer.depth_codes

    @property
    def trace(self) -> np.ndarray:
        return self.answer.trace


class _Head:
    """The LM head's rows for one closed set of ids, as a contiguous float32 matrix, and its logits buffer."""

    def __init__(self, lm_head: np.ndarray, ids: np.ndarray):
        self.ids = np.unique(np.asarray(ids, dtype=np.int64))      # sorted: the first maximum is the lowest id
        if self.ids[0] < 0 or self.ids[-1] >= lm_head.shape[0]:
            raise EdgeactError(f"choice ids {self.ids[0]}..{self.ids[-1]} lie outside the LM head's {lm_head.shape[0]} "
                               "rows; the bundle's tokenizer and weights do not match: re-export it")
        self.weight = np.ascontiguousarray(lm_head[self.ids], dtype=np.float32)
        self.logits = np.empty(len(self.ids), np.float32)
        # pick() scores one row per distinct row, the lowest id's: equal rows tie exactly, and a matmul over the small
        # matrix may round them apart by where they sit, which would break "ties to the lowest id"
        _, first = np.unique(self.weight, axis=0, return_index=True)
        distinct = np.sort(first)
        self._pick_ids = self.ids[distinct]
        self._pick_weight = np.ascontiguousarray(self.weight[distinct])
        self._pick_logits = np.empty(len(distinct), np.float32)

    def pick(self, hidden: np.ndarray) -> int:
        np.matmul(self._pick_weight, hidden, out=self._pick_logits)
        return int(self._pick_ids[int(np.argmax(self._pick_logits))])

    def median(self, hidden: np.ndarray) -> int:
        """The id at which the softmax's cumulative probability first reaches one half (ids in order)."""
        np.matmul(self.weight, hidden, out=self.logits)
        p = np.exp(self.logits - self.logits.max())
        cumulative = np.cumsum(p)
        return int(self.ids[min(int(np.searchsorted(cumulative, 0.5 * cumulative[-1])), len(self.ids) - 1)])


class DecodeProgram:
    """Decodes answers with one DecoderEngine; not thread-safe (one program per decoding thread)."""

    def __init__(self, decoder: DecoderEngine, embedding: np.ndarray, lm_head: np.ndarray, grammar: AnswerGrammar,
                 image_patch_id: int, stats: ActionStats | None = None, action_decoding: str = "greedy",
                 draft_tokens: int = 0):
        if action_decoding not in ACTION_DECODINGS:
            raise ConfigError(f"action_decoding {action_decoding!r} unknown; use one of {', '.join(ACTION_DECODINGS)}")
        check_draft_tokens(draft_tokens)
        if draft_tokens and not getattr(decoder, "all_hidden_states", False):
            raise ConfigError(f"draft_tokens: {type(decoder).__name__} returns only a chunk's last hidden state, which "
                              "drafting cannot verify with; set draft_tokens: 0")
        if embedding.shape[1] != decoder.layout.hidden_size or lm_head.shape[1] != decoder.layout.hidden_size:
            raise EdgeactError(f"embedding {list(embedding.shape)} / lm_head {list(lm_head.shape)} do not match the "
                               f"decoder's width {decoder.layout.hidden_size}; the bundle is inconsistent: re-export it")
        self.decoder, self.embedding, self.lm_head = decoder, embedding, lm_head
        self.grammar, self.image_patch_id, self.stats = grammar, image_patch_id, stats
        self._base_vocab = grammar.layout.base_vocab_size
        self._longest = longest_answer(grammar)    # answer ids at most, end-of-text included (trace not forced)
        self._seq = np.zeros(decoder.layout.max_seq, np.int64)     # prompt, then answer ids: what is (to be) fed
        self._hidden = np.zeros(decoder.layout.hidden_size, np.float32)
        self._patches = (np.zeros(0, np.int64), np.zeros((0, decoder.layout.hidden_size), np.float32))
        # The LM head sliced per closed set, keyed by the set's id bytes. Depth codes and action bins
        # are sliced now; the trace's sets (a dozen subsets of the digits and its separators, a few
        # rows each) on first use.
        self._heads: dict[bytes, _Head] = {}
        self._median_head: _Head | None = None       # the action bins' head, where actions are decoded by median
        # Drafting: the last answer's ids and where its action bins begin (None until an answer was decoded).
        self.draft_tokens = draft_tokens
        self._previous: tuple[np.ndarray, int | None] | None = None
        self._fed = 0            # positions in the cache; those from n_seq on hold drafted tokens not yet decided
        self._rows_start = 0     # the position of the last decoder call's first hidden row
        self._rows = np.zeros((0, decoder.layout.hidden_size), np.float32)   # a drafting call's hidden rows
        # Tokens from one action's first bin to the next's, and from the first action's first bin to the last's
        # end: where an action is drafted from the one before it in the same answer.
        actions = next((seg for seg in grammar.segments if isinstance(seg, Actions)), None)
        self._action_stride = (0, 0)         # a grammar without actions: nothing drafted within the answer
        if actions is not None:
            per_action = actions.dims + (actions.dims - 1) * len(actions.token_sep.ids)
            self._action_stride = (per_action + len(actions.action_sep.ids), actions.n_actions * per_action
                                   + (actions.n_actions - 1) * len(actions.action_sep.ids))
        for seg in grammar.segments:
            if isinstance(seg, DepthCodes):
                self._head_for(np.array(sorted(seg.code_ids), dtype=np.int64))
            elif isinstance(seg, Actions):
                head = self._head_for(np.array(sorted(seg.action_ids), dtype=np.int64))
                if action_decoding == "median":
                    self._median_head = head

    def _head_for(self, ids: np.ndarray) -> _Head:
        key = ids.tobytes()
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = _Head(self.lm_head, ids)
        return head

    # ------------------------------------------------------------------------------ decoding
    def run(self, prompt_ids: Sequence[int] | np.ndarray, image_features: np.ndarray | None = None,
            pooled_patches_idx: np.ndarray | None = None, *, depth_codes: Sequence[int] | None = None,
            trace: Sequence[Sequence[int]] | None = None, image_size_px: tuple[int, int] | None = None,
            stage_seconds: dict[str, float] | None = None) -> DecodeResult:
        """Decode one answer after `prompt_ids` (image features added at its <im_patch> tokens).

        depth_codes: force these 100 codes (e.g. from the depth sensor) instead of choosing them.
        trace: force these [x, y] points in [0, 256) (a user's edited plan); only actions are chosen.
        image_size_px: (width, height) of the first image, to give the trace in pixels.
        stage_seconds: times already spent (preprocess, vision); prefill, decode and parse are added.
        Raises SequenceTooLongError before the prefill where the longest answer the grammar allows (with this
        forced trace, if any) would not fit after the prompt in max_seq.
        """
        seconds = dict(stage_seconds or {})
        start = time.perf_counter()
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise EdgeactError("the prompt is empty; build it with edgeact.runtime.prompt.build_prompt_ids")
        self._check_fits(n_prompt, self._longest if trace is None else longest_answer(self.grammar, trace))
        self._seq[:n_prompt] = prompt
        self._patches = self._patch_features(prompt, image_features, pooled_patches_idx)
        self.decoder.reset()
        self._fed = self._rows_start = 0
        n_seq, steps, choices = n_prompt, 0, 0
        prefill_end = None
        draft = _Draft(self._previous, self.draft_tokens, n_prompt, self._seq, self._action_stride)
        walk = answer_steps(self.grammar, depth_codes=depth_codes, trace=trace)
        step = next(walk)
        while True:
            if isinstance(step, Forced):
                k = len(step.ids)
                self._check_room(n_seq, k)
                self._decide(n_seq, step.ids, draft)
                n_seq += k
                sent = None
            else:
                if len(step.ids) == 1:
                    sent = int(step.ids[0])      # a closed set of one: the masked argmax needs no logits
                else:
                    choices += 1
                    if step.kind == "action":
                        draft.at_action(n_seq)
                    if n_seq - 1 < self._fed:    # its predecessor went in with the last call (as a drafted token)
                        hidden = self._row(n_seq - 1, "decode")
                    elif prefill_end is None:
                        self._feed(self._fed, n_seq, "prefill")
                        hidden = self._hidden
                        prefill_end = time.perf_counter()
                    else:
                        hidden, calls = self._call(n_seq, draft)
                        steps += calls
                    head = self._head_for(step.ids)
                    sent = head.median(hidden) if head is self._median_head else head.pick(hidden)
                self._check_room(n_seq, 1)
                self._decide(n_seq, (sent,), draft)
                n_seq += 1
            try:
                step = walk.send(sent)
            except StopIteration:
                break
        if self.draft_tokens:
            self._previous = (self._seq[n_prompt:n_seq].copy(), draft.actions_at)
        decoded = time.perf_counter()
        if self._fed > n_seq:       # drafted tokens past the answer's end: forgotten, so release() has room
            self.decoder.cache.rewind(n_seq)
        self.decoder.release()      # not a decode step: timed apart, so decode seconds / steps is a step's time
        seconds["prefill"] = (prefill_end or decoded) - start
        seconds["decode"] = decoded - (prefill_end or decoded)
        seconds["release"] = time.perf_counter() - decoded
        return self._result(self._seq[n_prompt:n_seq].copy(), n_prompt, steps, choices, depth_codes is not None,
                            trace is not None, image_size_px, seconds)

    def check_fits(self, n_prompt: int, trace=None) -> None:
        """Refuse a prompt of n_prompt tokens after which the longest answer (with this forced trace) would not fit:
        callers check it before their own work on the frame (the depth tokenizer, the ViT)."""
        self._check_fits(n_prompt, self._longest if trace is None else longest_answer(self.grammar, trace))

    def _check_fits(self, n_prompt: int, longest: int) -> None:
        """Refuse before the prefill a prompt after which the longest answer the grammar allows would not fit."""
        excess = n_prompt + longest - len(self._seq)
        if excess > 0:
            raise SequenceTooLongError(
                f"the prompt's {n_prompt} tokens plus the longest answer's {longest} need {n_prompt + longest} "
                f"positions, more than the bundle's max_seq {len(self._seq)}; shorten the instruction by at least "
                f"{excess} token{'s' if excess > 1 else ''} or re-export with a larger --max-seq")

    def _check_room(self, n_seq: int, k: int) -> None:
        if n_seq + k > len(self._seq):
            raise SequenceTooLongError(f"prompt and answer need more than the bundle's max_seq {len(self._seq)} "
                                       "positions; re-export with a larger --max-seq or shorten the prompt")

    def _feed(self, start: int, end: int, stage: str) -> int:
        """Feed seq[start:end] in chunks of at most max_chunk; the last position's hidden state is left in _hidden."""
        decoder, calls = self.decoder, 0
        while start < end:
            n = min(end - start, decoder.max_chunk)
            self._embed(start, n)
            self._rows_start = start
            self._hidden = decoder.step(n)
            start += n
            calls += 1
        self._fed = end
        _check_finite(self._hidden, stage, end - 1)
        return calls

    def _call(self, n_seq: int, draft: "_Draft") -> tuple[np.ndarray, int]:
        """The decoder call for the choice at n_seq: the queued tokens, then what the draft offers after them (into
        seq as undecided tokens). Returns the hidden state of position n_seq - 1 and the calls made."""
        start = self._fed
        room = min(self.decoder.max_chunk - (n_seq - start), len(self._seq) - n_seq)
        offered = draft.offer(n_seq, room)
        end = n_seq + len(offered)
        self._seq[n_seq:end] = offered
        if len(offered) == 0:
            calls = self._feed(start, end, "decode")
            return self._hidden, calls
        self._embed(start, end - start)
        self._rows_start = start
        self.decoder.step(end - start)
        self._rows = self.decoder.hidden_states(end - start)    # one copy per call on a device backend
        self._fed = end
        return self._row(n_seq - 1, "decode"), 1

    def _row(self, position: int, stage: str) -> np.ndarray:
        """The hidden state of `position`, from the last drafting call's rows."""
        hidden = self._rows[position - self._rows_start]
        _check_finite(hidden, stage, position)
        return hidden

    def _decide(self, position: int, ids: tuple[int, ...], draft: "_Draft") -> None:
        """ids are the answer's tokens from `position` on. Where drafted tokens went in there, the first that
        differs ends the draft: the cache forgets it and everything after it."""
        end = position + len(ids)
        if position < self._fed:         # only where a draft went in: no array per token otherwise
            fed = self._seq[position:min(end, self._fed)]
            wrong = np.flatnonzero(fed != np.asarray(ids[:len(fed)], dtype=np.int64))
            if len(wrong):
                first = position + int(wrong[0])
                self.decoder.cache.rewind(first)
                draft.rejected(first)
                self._fed = first
            elif end >= self._fed:
                draft.held(self._fed)
        self._seq[position:end] = ids

    def forget_draft(self) -> None:
        """The next answer drafts from no earlier answer (e.g. the scene or the instruction changed)."""
        self._previous = None

    def _embed(self, start: int, n: int) -> None:
        """Embeddings of seq[start:start+n] into the decoder's input buffer, image features added in the prompt."""
        out, ids, table = self.decoder.embeds[:n], self._seq[start:start + n], self.embedding
        if n == 1:
            np.copyto(out[0], table[ids[0]])          # a row view: no temporary (the per-token path)
        elif table.dtype == np.float32:
            np.take(table, ids, axis=0, out=out)
        else:
            out[...] = table[ids]
        positions, features = self._patches
        if len(positions) and start <= positions[-1]:
            lo, hi = np.searchsorted(positions, (start, start + n))
            if hi > lo:
                out[positions[lo:hi] - start] += features[lo:hi]

    def _patch_features(self, prompt: np.ndarray, image_features, pooled_patches_idx) -> tuple[np.ndarray, np.ndarray]:
        """(positions of <im_patch> in the prompt, the feature added at each): padding-only pooled rows dropped."""
        positions = np.flatnonzero(prompt == self.image_patch_id)
        if image_features is None:
            features = np.zeros((0, self.decoder.layout.hidden_size), np.float32)
        else:
            if pooled_patches_idx is None:
                raise EdgeactError("image features given without pooled_patches_idx; pass the preprocessor's too")
            features = np.asarray(image_features, dtype=np.float32)[(np.asarray(pooled_patches_idx) >= 0).any(-1)]
        if len(positions) != len(features):
            raise EdgeactError(f"{len(positions)} <im_patch> tokens for {len(features)} image features; build the prompt "
                               "and pooled_patches_idx from the same preprocessing")
        return positions, features

    def _result(self, token_ids: np.ndarray, n_prompt: int, steps: int, choices: int, depth_forced: bool,
                trace_forced: bool, image_size_px: tuple[int, int] | None, seconds: dict[str, float]) -> DecodeResult:
        start = time.perf_counter()
        answer = self.grammar.parse_ids(token_ids)
        normalized = action_ids_to_values(answer.action_ids, self._base_vocab)
        actions = unnormalize_actions(normalized, self.stats) if self.stats is not None else normalized
        trace_px = trace_to_pixels(answer.trace, *image_size_px) if image_size_px else None
        seconds["parse"] = time.perf_counter() - start
        return DecodeResult(answer=answer, token_ids=token_ids, actions_normalized=normalized, actions=actions,
                            trace_px=trace_px, prompt_tokens=n_prompt, decode_steps=steps, choices=choices,
                            depth_forced=depth_forced, trace_forced=trace_forced, stage_seconds=seconds)


def check_draft_tokens(draft_tokens: int) -> None:
    """A draft length: an integer >= 0 (a call's chunk limit trims a longer draft)."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
        raise ConfigError(f"draft_tokens: {draft_tokens!r} must be an integer >= 0 (0: off; {DEFAULT_DRAFT_TOKENS} "
                          "drafts a robot's consecutive answers)")


def _check_finite(hidden: np.ndarray, stage: str, position: int) -> None:
    if not np.isfinite(hidden).all():     # D values per choice; argmax over NaN would pick the first id
        raise NonFiniteOutputError(
            f"decoder stage ({stage}, position {position}): the engine produced non-finite values (NaN or inf) in "
            "the hidden state, e.g. an fp16 overflow, so no token can be chosen; run an fp32 bundle or one that "
            "passed `edgeact verify`")


_NOTHING = np.zeros(0, np.int64)


class _Draft:
    """What to offer after the queued tokens at each position of this answer, and how many per call.

    From the second action of the chunk on: the token one action earlier in this answer (decided, or offered
    in the same call). Elsewhere the previous answer's: positions align one for one from the answer's start,
    and from this answer's first action bin on with the previous answer's first action bin (the traces before
    them may differ in length)."""

    def __init__(self, previous: tuple[np.ndarray, int | None] | None, most: int, n_prompt: int, seq: np.ndarray,
                 action_stride: tuple[int, int]):
        self.ids, self._prev_actions = previous if previous is not None else (np.zeros(0, np.int64), None)
        self.most = self.length = most
        self.n_prompt, self.seq = n_prompt, seq
        self.stride, self.span = action_stride
        self.shift = 0                       # previous answer's index = this answer's index + shift
        self.actions_at: int | None = None   # this answer's index of its first action bin
        self._offered: tuple[int, int] | None = None

    def at_action(self, position: int) -> None:
        if self.actions_at is None:
            self.actions_at = position - self.n_prompt
            self.length = self.most              # drafted from here on as well as can be: the full length back
            if self._prev_actions is not None:
                self.shift = self._prev_actions - self.actions_at

    def offer(self, position: int, room: int) -> np.ndarray:
        if self.length <= 0 or room <= 0:       # drafting off (or no room): the decode step's path stays as it was
            self._offered = None
            return _NOTHING
        out = np.empty(min(self.length, room), np.int64)
        n = 0
        for q in range(position, position + len(out)):
            token = self._token(q, position, out)
            if token is None:
                break
            out[n] = token
            n += 1
        self._offered = (position, position + n) if n else None
        return out[:n]

    def _token(self, q: int, position: int, out: np.ndarray) -> int | None:
        index = q - self.n_prompt
        if self.actions_at is not None and self.actions_at + self.stride <= index < self.actions_at + self.span:
            earlier = q - self.stride            # the same place in the action before
            return int(self.seq[earlier] if earlier < position else out[earlier - position])
        i = index + self.shift
        return int(self.ids[i]) if 0 <= i < len(self.ids) else None

    def rejected(self, position: int) -> None:
        if self._offered is not None and self._offered[0] <= position < self._offered[1]:
            if position == self._offered[0]:
                self.length = max(1, self.length // 2)     # the first drafted token was wrong: offer less
            self._offered = None

    def held(self, fed: int) -> None:
        if self._offered is not None and self._offered[1] <= fed:
            self.length = min(2 * self.length, self.most)
            self._offered = None
