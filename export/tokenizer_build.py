"""Build a small synthetic MolmoAct tokenizer: Qwen2-style byte-level BPE with MolmoAct's id layout.

Id layout (edgeact.runtime.token_layout reads it):

    [0, Vb)            base BPE vocabulary: learned tokens, then the 4 byte-pair prefixes of
                       the action characters, then the 256 action tokens (the last 256 ids)
    Vb                 <|endoftext|>  (also BOS)
    Vb+1, Vb+2         <DEPTH_START>, <DEPTH_END>
    Vb+3 .. Vb+130     <DEPTH_0> .. <DEPTH_127>
    .. vocab_size-1    unused rows: vocab_size = Vb+131 rounded up to a multiple of 128, like Qwen's
    vocab_size+0..+5   <im_start> <im_end> <im_patch> <im_col> <|image|> <im_low>, which index
                       the embedding's additional rows and are never generated

The action tokens are, like Qwen2's last base ids, rare CJK merges: U+4E00..U+4EFF, each reached
by two merges of its three UTF-8 bytes, so the text of an action token encodes back to its id.
`tokenizers` assigns added tokens consecutive ids when it loads a file, ignoring the ids written
there; putting the special tokens into the BPE vocabulary at their ids as well makes it keep
the gaps. No torch needed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from edgeact.export.tokenizer_build_corpus import ACTION_CHAR_FIRST, N_ACTION_CHARS, action_chars_in, corpus
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.token_layout import DEPTH_END, DEPTH_START, END_OF_TEXT, IMAGE_TOKENS, N_DEPTH_CODES, depth_token

# Qwen2's pre-tokenizer split: digits alone (\p{N}), letters with one leading non-letter, punctuation runs.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LEARNED_VOCAB = 1280      # cap on learned tokens (256 byte symbols + merges); the corpus may yield fewer
VOCAB_MULTIPLE = 128      # config vocab_size is padded to this, as Qwen's 152064 is
N_AFTER_BASE = 1 + 2 + N_DEPTH_CODES   # <|endoftext|>, <DEPTH_START>, <DEPTH_END>, <DEPTH_k>


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE tokens are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _learned(extra_texts: list[str]) -> dict:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = _pre_tokenizer()
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LEARNED_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(corpus(extra_texts), trainer)
    return json.loads(bpe.to_str())


def _added(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def build_tokenizer(extra_texts: Iterable[str] = ()) -> Tokenizer:
    """Train the BPE on MolmoAct prompts/answers (+ extra_texts, e.g. a task's instructions) and lay out the ids."""
    extra = list(extra_texts)
    clash = sorted({c for t in extra for c in action_chars_in(t)})
    if clash:
        raise ConfigError(f"extra_texts contain {''.join(clash[:8])!r}: characters U+4E00..U+4EFF are the action tokens; "
                          "remove them from the training text")
    data = _learned(extra)
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    sym = _byte_symbols()

    # The action block: 4 two-byte prefixes (E4 B8..BB), then each character = prefix + third byte.
    for second in range(0xB8, 0xBC):
        prefix = sym[0xE4] + sym[second]
        if prefix in vocab:
            raise ConfigError(f"the learned vocabulary already holds the action prefix {prefix!r}; remove CJK text from extra_texts")
        vocab[prefix] = len(vocab)
        merges.append([sym[0xE4], sym[second]])
    for j in range(N_ACTION_CHARS):
        utf8 = chr(ACTION_CHAR_FIRST + j).encode("utf-8")
        prefix, third = sym[utf8[0]] + sym[utf8[1]], sym[utf8[2]]
        vocab[prefix + third] = len(vocab)
        merges.append([prefix, third])
    base = len(vocab)

    specials = [(END_OF_TEXT, True), (DEPTH_START, False), (DEPTH_END, False)]
    specials += [(depth_token(k), False) for k in range(N_DEPTH_CODES)]   # kept by a plain decode()
    ids = list(range(base, base + len(specials)))
    vocab_size = config_vocab_size_for(base)
    specials += [(t, True) for t in IMAGE_TOKENS]
    ids += list(range(vocab_size, vocab_size + len(IMAGE_TOKENS)))
    data["added_tokens"] = []
    for tid, (content, special) in zip(ids, specials):
        vocab[content] = tid
        data["added_tokens"].append(_added(tid, content, special))

    data["normalizer"] = None
    data["post_processor"] = None
    tokenizer = Tokenizer.from_str(json.dumps(data))   # pre-tokenizer and decoder come from the trained one
    _check(tokenizer, base)
    return tokenizer


def config_vocab_size_for(base_vocab_size: int) -> int:
    need = base_vocab_size + N_AFTER_BASE
    return -(-need // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def config_vocab_size(tokenizer: Tokenizer) -> int:
    """`llm_config.vocab_size` for this tokenizer: LM-head rows, image tokens excluded."""
    return config_vocab_size_for(tokenizer.token_to_id(END_OF_TEXT))


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write tokenizer.json (into `path` if it is a directory); same tokenizer -> same bytes."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    path.write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    return path


def _check(tokenizer: Tokenizer, base: int) -> None:
    """The layout promises above, verified on the object we hand out."""
    vocab_size = config_vocab_size_for(base)
    expected = {END_OF_TEXT: base, DEPTH_START: base + 1, DEPTH_END: base + 2, depth_token(0): base + 3,
                depth_token(N_DEPTH_CODES - 1): base + 2 + N_DEPTH_CODES}
    expected.update({t: vocab_size + k for k, t in enumerate(IMAGE_TOKENS)})
    for token, tid in expected.items():
        if tokenizer.token_to_id(token) != tid:
            raise AssertionError(f"{token} has id {tokenizer.token_to_id(token)}, layout needs {tid}")
    for j in range(N_ACTION_CHARS):     # every one: a learned merge can take any of their byte pairs first
        char, tid = chr(ACTION_CHAR_FIRST + j), base - N_ACTION_CHARS + j
        if tokenizer.encode(char, add_special_tokens=False).ids != [tid] or tokenizer.decode([tid]) != char:
            # only extra training texts can do this: their characters share the action character's last bytes
            raise ConfigError(f"action token {char!r} (U+{ord(char):04X}) does not round-trip through id {tid}: the "
                              "extra training texts hold characters whose UTF-8 bytes the BPE merged first; remove "
                              "the CJK characters from those texts")
