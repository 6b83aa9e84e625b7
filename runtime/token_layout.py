"""Where the special, depth, digit and action tokens sit in a MolmoAct tokenizer's id space.

Qwen2 convention (and edgeact's synthetic tokenizers follow it): the byte-level BPE base
vocabulary has Vb entries, `<|endoftext|>` has id Vb and doubles as BOS, and the action
tokens are the last 256 ids of the base vocabulary (Vb-256 .. Vb-1). Every other special
token is looked up by its string, so published and synthetic tokenizers read the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeact.runtime.errors import CheckpointError

END_OF_TEXT = "<|endoftext|>"
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>", "<im_low>")
DEPTH_START, DEPTH_END = "<DEPTH_START>", "<DEPTH_END>"
N_DEPTH_CODES = 128
N_ACTION_TOKENS = 256


def depth_token(k: int) -> str:
    return f"<DEPTH_{k}>"


@dataclass(frozen=True)
class TokenLayout:
    base_vocab_size: int          # Vb: id of <|endoftext|>; action ids are Vb-256 .. Vb-1
    bos_id: int
    im_start_id: int
    im_end_id: int
    im_patch_id: int
    im_col_id: int
    depth_start_id: int
    depth_end_id: int
    depth_code_ids: np.ndarray    # (128,) id of <DEPTH_k>
    digit_ids: np.ndarray         # (10,) id of "0" .. "9"

    @property
    def action_ids(self) -> np.ndarray:
        """(256,) ids; action_ids[j] = Vb - 256 + j."""
        return np.arange(self.base_vocab_size - N_ACTION_TOKENS, self.base_vocab_size, dtype=np.int64)

    @classmethod
    def from_tokenizer(cls, tokenizer, source: str = "tokenizer.json") -> "TokenLayout":
        def need(token: str) -> int:
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise CheckpointError(f"{source}: token {token!r} missing; a MolmoAct tokenizer defines it")
            return tid

        digits = []
        for d in "0123456789":
            ids = tokenizer.encode(d, add_special_tokens=False).ids
            if len(ids) != 1:
                raise CheckpointError(f"{source}: digit {d!r} is not a single token; trace coordinates need single-digit tokens as in Qwen2")
            digits.append(ids[0])
        return cls(
            base_vocab_size=need(END_OF_TEXT),
            bos_id=need(END_OF_TEXT),
            im_start_id=need("<im_start>"),
            im_end_id=need("<im_end>"),
            im_patch_id=need("<im_patch>"),
            im_col_id=need("<im_col>"),
            depth_start_id=need(DEPTH_START),
            depth_end_id=need(DEPTH_END),
            depth_code_ids=np.array([need(depth_token(k)) for k in range(N_DEPTH_CODES)], dtype=np.int64),
            digit_ids=np.array(digits, dtype=np.int64),
        )

    def check_config(self, cfg, tokenizer_source: str, config_source: str) -> None:
        """Refuse a tokenizer and a config.json that disagree: the <im_patch> id the prompt is built with must be the
        one the model adds image features to, and every id the answer chooses from must be a row of the LM head."""
        if self.im_patch_id != cfg.image_patch_id:
            raise CheckpointError(f"{tokenizer_source} has <im_patch> at id {self.im_patch_id} but {config_source} "
                                  f"says image_patch_id {cfg.image_patch_id}; they come from different checkpoints: "
                                  "use the tokenizer.json the model was trained with")
        rows = cfg.llm_config.vocab_size
        chosen = {"depth codes": self.depth_code_ids, "digits": self.digit_ids, "action bins": self.action_ids}
        outside = {name: (int(ids.min()), int(ids.max())) for name, ids in chosen.items()
                   if ids.min() < 0 or ids.max() >= rows}
        if outside:
            spans = ", ".join(f"{name} at ids {lo}..{hi}" for name, (lo, hi) in outside.items())
            raise CheckpointError(f"{tokenizer_source} has {spans}, outside the LM head's {rows} rows "
                                  f"({config_source}: llm_config.vocab_size {rows}); the tokenizer and the config "
                                  "come from different checkpoints")

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenLayout":
        return cls.from_tokenizer(load_tokenizer(path), str(path))


def load_tokenizer(path: str | Path):
    """Read a `tokenizer.json` (or the one inside a checkpoint/bundle directory)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: not found; a checkpoint needs its tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from None
