"""The reference ARM's training pipeline: demos -> sequences -> a few AdamW steps -> a loadable MolmoAct checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco")

from edgeact.export.train_reference import (  # noqa: E402
    NORM_KEY,
    TrainOptions,
    batch_logits,
    collate,
    greedy_answer,
    prepare,
    train_reference,
    train_steps,
)
from edgeact.export.train_reference_data import (  # noqa: E402
    DEPTH_RANGE_M,
    IGNORE,
    ReferenceEncoder,
    pooled_depth_codes,
    split_by_episode,
    task_instructions,
)

# The test architecture is the "tiny" size: the pipeline is the same as for "reference", only faster.
TINY = dict(size="tiny", batch_size=2, lr=3e-3, warmup_steps=2, held_out_fraction=0.34, eval_samples=4)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from edgeact.drivers.sim.demos import DemoConfig, record_demos

    out = tmp_path_factory.mktemp("demos") / "set"
    record_demos(out, episodes=3, seed=0, config=DemoConfig(width=64, height=48, stride_actions=8))
    return out


def test_pooled_depth_codes_stand_in():
    low, high = DEPTH_RANGE_M
    depth = np.full((48, 64), low + (high - low) * 0.5, dtype=np.float32)
    depth[:5, :7] = 0.0                     # the first cell has no data at all
    depth[5:10, 7:13] = high + 1.0          # beyond the range: the last code
    codes = pooled_depth_codes(depth)
    assert codes.shape == (100,) and codes.dtype == np.int64
    assert codes[0] == 0 and codes[11] == 127 and np.all(codes[[1, 50, 99]] == 64)
    depth[20:25, 30:35] = 0.0               # holes are left out of a cell's mean, not averaged in as 0 m
    assert np.array_equal(pooled_depth_codes(depth), codes)


def test_the_vqvae_is_a_drop_in_depth_codes_fn(tmp_path):
    from edgeact.export.depth_tokenizer import DepthVQVAE, save_depth_tokenizer
    from edgeact.export.train_reference_data import vqvae_depth_codes_fn

    torch.manual_seed(0)
    save_depth_tokenizer(DepthVQVAE(), tmp_path)
    codes = vqvae_depth_codes_fn(tmp_path)(np.random.default_rng(0).uniform(0.3, 1.5, (48, 64)))
    assert codes.shape == (100,) and codes.dtype == np.int64 and 0 <= codes.min() and codes.max() < 128


def test_split_holds_out_whole_episodes():
    episodes = np.repeat(np.arange(10), 3)
    train, held = split_by_episode(episodes, 0.2, seed=1)
    assert len(train) + len(held) == 30 and len(held) == 6
    assert not set(episodes[train]) & set(episodes[held])


def test_sequences_put_the_loss_on_the_answer_only_and_padding_changes_nothing(demos):
    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    enc: ReferenceEncoder = trainer.encoder
    assert all(enc.tokenizer.encode(t, add_special_tokens=False).ids for t in task_instructions())
    seq = enc.encode(trainer.arrays, 0)
    answer = enc.grammar.to_ids(enc.answer(trainer.arrays, 0))
    assert np.all(seq.labels[:seq.n_prompt - 1] == IGNORE)
    assert np.array_equal(seq.labels[seq.n_prompt - 1:], answer)        # every answer token, eos included
    assert np.array_equal(seq.ids[seq.n_prompt:], answer[:-1])          # teacher forcing: the shifted answer
    parsed = enc.grammar.parse_ids(answer)
    assert np.array_equal(parsed.trace, trainer.arrays["trace"][0][:trainer.arrays["trace_len"][0]])
    assert np.array_equal(parsed.depth_codes, pooled_depth_codes(trainer.arrays["depth_m"][0]))
    assert (seq.kinds == 0).sum() == 100 and (seq.kinds == 2).sum() == 8 * 7

    # A right-padded batch gives each sequence the logits it gets alone (causal attention).
    lengths = [len(enc.encode(trainer.arrays, i).ids) for i in range(len(trainer.arrays["rgb"]))]
    short, long = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[short] < lengths[long]
    pad = enc.layout.bos_id
    with torch.inference_mode():
        both = batch_logits(trainer.model, collate([enc.encode(trainer.arrays, i) for i in (long, short)], pad))
        alone = batch_logits(trainer.model, collate([enc.encode(trainer.arrays, short)], pad))
    torch.testing.assert_close(both[1, :lengths[short]], alone[0], rtol=1e-4, atol=1e-4)


def test_training_learns_and_saves_a_loadable_checkpoint(demos, tmp_path):
    from edgeact.drivers.sim.demos import load_demos
    from edgeact.export.checkpoint import load_model
    from edgeact.export.tokenizer_build import config_vocab_size
    from edgeact.runtime.token_layout import load_tokenizer

    out = tmp_path / "ckpt"
    report = train_reference(demos, out, TrainOptions(steps=10, **TINY))
    assert len(report.losses) == 10 and np.mean(report.losses[-3:]) < np.mean(report.losses[:3]) - 0.5
    assert set(report.held_out_accuracy) == {"depth", "trace", "action", "text", "all"}
    assert report.held_out_samples > 0 and np.isfinite(report.action_bin_error)

    model, ckpt = load_model(out)       # the checkpoint's own checks: shapes, norm_stats, tokenizer
    assert ckpt.norm_stats == {NORM_KEY: load_demos(demos).norm_stats[NORM_KEY]}
    assert ckpt.config.llm_config.vocab_size == config_vocab_size(load_tokenizer(out))
    assert sum(p.stat().st_size for p in out.iterdir()) < 20e6
    log = json.loads((out / "training_log.json").read_text())
    assert log["losses"] == report.losses and log["options"]["steps"] == 10

    # Grammar-masked greedy decoding of the loaded model gives a complete, parseable answer.
    encoder = ReferenceEncoder(load_tokenizer(out), ckpt.config, ckpt.preprocess_config, ckpt.norm_stats, NORM_KEY)
    arrays = load_demos(demos).arrays()
    answer = greedy_answer(model, encoder, arrays["rgb"][0], str(arrays["instruction"][0]))
    assert answer.depth_codes.shape == (100,) and answer.action_ids.shape == (8, 7)
    assert 1 <= len(answer.trace) <= 5


def test_same_seed_same_weights(demos):
    def weights(seed):
        trainer = prepare(demos, TrainOptions(steps=3, seed=seed, **TINY))
        losses = train_steps(trainer)
        return losses, trainer.model.state_dict()

    (loss_a, a), (loss_b, b), (_, c) = weights(0), weights(0), weights(1)
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_the_command_records_demos_then_trains(tmp_path, capsys):
    import argparse

    from edgeact.export import commands_train
    from edgeact.export.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser()
    commands_train.register(parser.add_subparsers())
    argv = ["train-reference", "--generate-demos", "3", "--demos", str(tmp_path / "demos"), "--out",
            str(tmp_path / "ckpt"), "--steps", "2", "--size", "tiny", "--batch-size", "2", "--threads", "1"]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    assert "reference ARM" in capsys.readouterr().out
    assert NORM_KEY in load_checkpoint(tmp_path / "ckpt").norm_stats
    assert (tmp_path / "ckpt" / commands_train.LOSS_PLOT).stat().st_size > 1000
    # Again: the same recording is reused; an existing checkpoint needs --overwrite.
    args = parser.parse_args(argv + ["--overwrite"])
    assert args.handler(args) == 0
    assert "reusing" in capsys.readouterr().out


def test_the_loss_weighs_each_answer_kind(demos):
    from edgeact.export.train_reference import weighted_loss
    from edgeact.export.train_reference_data import KINDS

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    batch = collate([trainer.encoder.encode(trainer.arrays, i) for i in (0, 1)], trainer.encoder.layout.bos_id)
    with torch.inference_mode():
        logits = batch_logits(trainer.model, batch)
    token_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                                 ignore_index=IGNORE, reduction="none")
    kinds = batch["kinds"].reshape(-1)
    for k, name in enumerate(KINDS):
        only = torch.zeros(len(KINDS) + 1)
        only[k] = 1.0
        expected = token_ce[kinds == k].mean()      # one kind weighted: the mean loss of that kind's tokens
        assert torch.allclose(weighted_loss(logits, batch, only), expected), name
    equal = torch.tensor([1.0] * len(KINDS) + [0.0])
    assert torch.allclose(weighted_loss(logits, batch, equal), token_ce[batch["labels"].reshape(-1) != IGNORE].mean())
    # The first action's 7 tokens of each sequence weigh first_action_weight times the other actions'.
    actions_only = torch.zeros(len(KINDS) + 1)
    actions_only[KINDS.index("action")] = 1.0
    is_action = (batch["kinds"] == KINDS.index("action"))
    lead = (is_action & (is_action.cumsum(dim=1) <= 7)).reshape(-1)
    rest = is_action.reshape(-1) & ~lead
    assert int(lead.sum()) == 7 * 2
    expected = (3 * token_ce[lead].sum() + token_ce[rest].sum()) / (3 * int(lead.sum()) + int(rest.sum()))
    assert torch.allclose(weighted_loss(logits, batch, actions_only, first_action_weight=3.0), expected)
    with pytest.raises(Exception, match="loss_weights"):
        TrainOptions(loss_weights=(0.0, 0.0, 0.0, 0.0))
