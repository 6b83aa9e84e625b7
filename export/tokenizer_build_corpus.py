"""The text a synthetic MolmoAct tokenizer's BPE merges are learned from: prompts and answers of many tasks."""
from __future__ import annotations

import re
from typing import Iterable, Iterator

from edgeact.runtime.grammar import ACTION_LEAD, ANSWER_SPACE, DEPTH_LEAD, LIST_SEP, NESTED_SEP, TRACE_LEAD
from edgeact.runtime.prompt import chat_text
from edgeact.runtime.token_layout import DEPTH_END, DEPTH_START, depth_token

# Action tokens are U+4E00..U+4EFF; the corpus must never teach merges that touch them.
ACTION_CHAR_FIRST = 0x4E00
N_ACTION_CHARS = 256

_VERBS = ("pick up", "put", "place", "move", "push", "pull", "open", "close", "stack", "lift",
          "slide", "grasp", "pour water from", "wipe", "turn on", "turn off", "flip", "drop",
          "insert", "hang", "fold", "press", "rotate", "sweep")
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "pink")
_THINGS = ("block", "cube", "bowl", "cup", "mug", "plate", "sponge", "drawer", "cabinet door", "bottle",
           "can", "spoon", "towel", "lid", "marker", "banana", "apple", "carrot", "box", "pot",
           "book", "switch", "faucet", "basket", "toy car")
_PLACES = ("on the plate", "in the bowl", "into the basket", "on the table", "in the drawer",
           "on top of the box", "next to the cup", "onto the shelf", "in the sink", "to the left",
           "to the right", "in front of the robot", "behind the mug", "on the stove", "into the pot")


def instructions(count: int = 240) -> list[str]:
    """Deterministic task instructions (no RNG: the corpus, hence the tokenizer, never changes)."""
    out = []
    for i in range(count):
        verb = _VERBS[i % len(_VERBS)]
        thing = f"{_COLOURS[(i * 3) % len(_COLOURS)]} {_THINGS[(i * 7) % len(_THINGS)]}"
        place = _PLACES[(i * 11) % len(_PLACES)]
        out.append(f"{verb} the {thing}" + (f" {place}" if i % 3 else ""))
    return out


def answer_text(i: int, n_actions: int) -> str:
    """A plausible answer: depth codes, a trace of 1..5 points, n_actions actions of 7 tokens."""
    depth = "".join(depth_token((i * 31 + k * 17) % 128) for k in range(100))
    n_points = 1 + i % 5
    points = NESTED_SEP.join(f"{(i * 37 + k * 91) % 256}{LIST_SEP}{(i * 53 + k * 29 + 7) % 256}" for k in range(n_points))

    def action(a: int) -> str:
        return LIST_SEP.join(chr(ACTION_CHAR_FIRST + (i * 13 + a * 7 + d * 41) % N_ACTION_CHARS) for d in range(7))

    actions = NESTED_SEP.join(action(a) for a in range(n_actions))
    opened, closed = ("[", "].") if n_actions == 1 else ("[[", "]].")
    return (f"{ANSWER_SPACE}{DEPTH_LEAD}{DEPTH_START}{depth}{DEPTH_END}{TRACE_LEAD}[[{points}]]"
            f"{ACTION_LEAD}{opened}{actions}{closed}")


# Special and action tokens never reach BPE: they are matched before pre-tokenization (special)
# or are fixed by hand (action). Cutting the text at them keeps every other pre-token as it is.
_NOT_LEARNED = re.compile(r"<DEPTH_(?:START|END|\d+)>|[\u4e00-\u4eff]")


def corpus(extra_texts: Iterable[str] = ()) -> Iterator[str]:
    for i, instr in enumerate(instructions()):
        yield chat_text(instr)
        for fragment in _NOT_LEARNED.split(answer_text(i, 1 if i % 2 else 8)):
            if fragment:
                yield fragment
    yield from extra_texts


def action_chars_in(text: str) -> list[str]:
    return sorted(set(re.findall(r"[\u4e00-\u4eff]", text)))
