"""The synthetic MolmoAct tokenizer: id layout, action/digit tokens, determinism, file round trip."""
import hashlib
import json
import subprocess
import sys

import pytest

from edgeact.export.tokenizer_build import build_tokenizer, config_vocab_size, save_tokenizer
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.grammar import ACTION_LEAD, DEPTH_LEAD
from edgeact.runtime.prompt import chat_text
from edgeact.runtime.token_layout import IMAGE_TOKENS, TokenLayout, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_id_layout_follows_qwen2_convention(tok):
    layout = TokenLayout.from_tokenizer(tok)
    vb = layout.base_vocab_size
    assert 600 < vb < 2100
    assert tok.token_to_id("<|endoftext|>") == vb == layout.bos_id
    assert layout.depth_start_id == vb + 1 and layout.depth_end_id == vb + 2
    assert layout.depth_code_ids.tolist() == list(range(vb + 3, vb + 131))
    vocab_size = config_vocab_size(tok)
    assert vocab_size % 128 == 0 and vb + 131 <= vocab_size < vb + 131 + 128
    assert [tok.token_to_id(t) for t in IMAGE_TOKENS] == list(range(vocab_size, vocab_size + 6))
    assert layout.im_patch_id == vocab_size + 2
    # The padding rows between the depth codes and vocab_size hold no token.
    assert all(tok.id_to_token(i) is None for i in range(vb + 131, vocab_size))


def test_every_action_token_is_a_cjk_character_that_round_trips(tok):
    layout = TokenLayout.from_tokenizer(tok)
    for j, tid in enumerate(layout.action_ids.tolist()):
        char = chr(0x4E00 + j)
        assert tok.encode(char, add_special_tokens=False).ids == [tid]
        assert tok.decode([tid]) == char
    # The 4 byte-pair prefixes sit just before the action block.
    assert tok.id_to_token(layout.base_vocab_size - 257) == "ä»"


def test_digits_are_single_tokens_and_text_round_trips(tok):
    layout = TokenLayout.from_tokenizer(tok)
    assert tok.encode("242", add_special_tokens=False).ids == layout.digit_ids[[2, 4, 2]].tolist()
    for text in (chat_text("pick up the red block"), " " + DEPTH_LEAD + "<DEPTH_START><DEPTH_5><DEPTH_END>" + ACTION_LEAD + "[一, 丁]."):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert "<DEPTH_7>" in tok.decode([layout.depth_code_ids[7]])   # depth tokens survive a plain decode


def test_bpe_learned_the_sentences(tok):
    # The fixed answer text must be cheap: whole words, not bytes.
    words = ACTION_LEAD.replace(",", "").strip(". ").split()
    n = len(tok.encode(ACTION_LEAD, add_special_tokens=False).ids)
    assert n == len(words) + ACTION_LEAD.count(",") + 2   # one per word and comma, '.', the trailing space


def test_saved_file_reloads_with_explicit_ids(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path)
    assert path.name == "tokenizer.json"
    loaded = load_tokenizer(tmp_path)
    a, b = TokenLayout.from_tokenizer(tok), TokenLayout.from_file(path)
    assert a.base_vocab_size == b.base_vocab_size and a.im_patch_id == b.im_patch_id
    assert a.depth_code_ids.tolist() == b.depth_code_ids.tolist()
    text = chat_text("open the drawer") + "<im_patch><im_col><DEPTH_9>"
    assert loaded.encode(text).ids == tok.encode(text).ids
    added = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    assert added["<im_low>"] == config_vocab_size(tok) + 5


def test_same_inputs_give_byte_identical_files(tok, tmp_path):
    again = build_tokenizer()
    assert again.to_str(pretty=True) == tok.to_str(pretty=True)
    # Across processes too (Rust hash maps are seeded per process).
    code = ("import hashlib; from edgeact.export.tokenizer_build import build_tokenizer; "
            "print(hashlib.sha256(build_tokenizer().to_str(pretty=True).encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == hashlib.sha256(tok.to_str(pretty=True).encode()).hexdigest()


def test_extra_texts_teach_new_words(tok):
    word = " zorbulator"
    before = len(tok.encode(word, add_special_tokens=False).ids)
    extended = build_tokenizer(["calibrate the zorbulator"] * 20)
    assert len(extended.encode(word, add_special_tokens=False).ids) < before
    TokenLayout.from_tokenizer(extended)


def test_extra_texts_with_action_characters_are_refused():
    with pytest.raises(ConfigError, match="action tokens"):
        build_tokenizer(["move 一 left"])
    # Characters outside the action block that share an action character's last two bytes (U+5E02 ... and U+4E02:
    # ?? B8 82): their merge would split that action token in two; every action token is checked.
    with pytest.raises(ConfigError, match=r"action token '丂' \(U\+4E02\) does not round-trip"):
        build_tokenizer(["市 渂 縂 踂 市渂縂踂"] * 20)
