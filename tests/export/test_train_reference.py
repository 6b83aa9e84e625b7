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
    KINDS,
    ReferenceEncoder,
    grounding_labels,
    pointing_targets,
    pooled_depth_codes,
    split_by_episode,
    task_instructions,
)

# The test architecture is the "tiny" size: the pipeline is the same as for "reference", only faster.
TINY = dict(size="tiny", batch_size=2, lr=3e-3, warmup_steps=2, held_out_fraction=0.34, eval_samples=4)


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
    fn = vqvae_depth_codes_fn(tmp_path)
    codes = fn(np.random.default_rng(0).uniform(0.3, 1.5, (48, 64)))
    assert codes.shape == (100,) and codes.dtype == np.int64 and 0 <= codes.min() and codes.max() < 128
    # What a model trained on it records: these weights' sha256 (another tokenizer's codes are other codes).
    import hashlib

    assert fn.identity == "vqvae:" + hashlib.sha256((tmp_path / "depth_tokenizer.safetensors").read_bytes()).hexdigest()


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
    assert report.image_use["samples"] == min(4, report.held_out_samples) and np.isfinite(report.image_use["own"])

    model, ckpt = load_model(out)       # the checkpoint's own checks: shapes, norm_stats, tokenizer
    assert ckpt.norm_stats == {NORM_KEY: load_demos(demos).norm_stats[NORM_KEY]}
    assert ckpt.config.llm_config.vocab_size == config_vocab_size(load_tokenizer(out))
    assert sum(p.stat().st_size for p in out.iterdir()) < 20e6
    log = json.loads((out / "training_log.json").read_text())
    assert log["losses"] == report.losses and log["options"]["steps"] == 10
    assert log["depth_codes"] == "pooled"         # the stand-in (no --depth-tokenizer): export records it

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


def test_loader_workers_encode_the_same_batches_in_the_same_order(demos):
    def run(workers):
        trainer = prepare(demos, TrainOptions(steps=3, loader_workers=workers, **TINY))
        return train_steps(trainer), trainer.model.state_dict()

    (loss_a, a), (loss_b, b) = run(0), run(2)
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)
    assert next(iter(a.values())).device.type == "cpu"     # back on the CPU for the held-out measures and saving


def test_a_warm_start_begins_from_the_checkpoint_and_refuses_one_that_does_not_fit(demos, tmp_path):
    import shutil

    from edgeact.drivers.sim.demos import MANIFEST
    from edgeact.export.checkpoint import load_checkpoint
    from edgeact.runtime.errors import ConfigError

    first = tmp_path / "first"
    train_reference(demos, first, TrainOptions(steps=2, **TINY))
    saved = load_checkpoint(first).tensors
    warm = prepare(demos, TrainOptions(steps=1, seed=5, init=str(first), **TINY)).model.state_dict()
    cold = prepare(demos, TrainOptions(steps=1, seed=5, **TINY)).model.state_dict()
    assert all(torch.equal(warm[k], saved[k]) for k in saved)
    assert not torch.equal(cold["lm_head.weight"], saved["lm_head.weight"])

    with pytest.raises(ConfigError, match="do not fit this architecture.*--size"):
        prepare(demos, TrainOptions(steps=1, init=str(first), **{**TINY, "size": "small"}))
    with pytest.raises(ConfigError, match="tokenizer"):      # pointing adds its instructions to the tokenizer
        prepare(demos, TrainOptions(steps=1, init=str(first), pointing_batch=1, **TINY))
    other = tmp_path / "other"
    shutil.copytree(demos, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["norm_stats"][NORM_KEY]["action"]["q99"] = [9.0] * 7
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="action statistics.*first"):
        prepare([other, demos], TrainOptions(steps=1, init=str(first), **TINY))


def test_the_training_device_is_checked():
    from edgeact.export.train_reference import training_device
    from edgeact.runtime.errors import ConfigError

    for bad in ("gpu", "cuda:x", "CPU"):
        with pytest.raises(ConfigError, match="'cpu', 'cuda' or 'cuda:N'"):
            TrainOptions(device=bad)
    with pytest.raises(ConfigError, match="loader_workers"):
        TrainOptions(loader_workers=-1)
    with pytest.raises(ConfigError, match="grounding_weight, target_probe_weight train on the CPU only"):
        TrainOptions(device="cuda", grounding_weight=1.0, target_probe_weight=1.0)
    assert training_device(TrainOptions()) == torch.device("cpu")
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA device"):
            training_device(TrainOptions(device=f"cuda:{torch.cuda.device_count()}"))
    else:
        with pytest.raises(ConfigError, match="no CUDA device.*train on the CPU"):
            training_device(TrainOptions(device="cuda"))


def test_the_command_refuses_a_missing_gpu_or_checkpoint_before_recording_anything(tmp_path):
    import argparse

    from edgeact.export import commands_train
    from edgeact.runtime.errors import ConfigError

    parser = argparse.ArgumentParser()
    commands_train.register(parser.add_subparsers())
    base = ["train-reference", "--demos", str(tmp_path / "demos"), "--out", str(tmp_path / "c"), "--generate-demos",
            "3"]

    def run(*extra):
        args = parser.parse_args(base + list(extra))
        return args.handler(args)

    with pytest.raises(ConfigError, match="no checkpoint there"):
        run("--init", str(tmp_path / "nowhere"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            run("--device", "cuda")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")     # the checkpoint is written after the last step: say it first
    with pytest.raises(ConfigError, match=r"--out .*c: already exists and is not empty; .* --overwrite"):
        run()
    assert not (tmp_path / "demos").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA); the same steps run on the CPU "
                                                          "in the tests above")
def test_steps_on_a_cuda_device_train_and_save_from_the_cpu(demos, tmp_path):
    report = train_reference(demos, tmp_path / "ckpt", TrainOptions(steps=10, device="cuda", loader_workers=2,
                                                                     **TINY))
    assert np.mean(report.losses[-3:]) < np.mean(report.losses[:3]) - 0.5
    assert report.held_out_samples > 0 and np.isfinite(report.action_bin_error)
    log = json.loads((tmp_path / "ckpt" / "training_log.json").read_text())
    assert log["options"]["device"] == "cuda"


def test_the_command_records_demos_then_trains(tmp_path, capsys):
    import argparse

    from edgeact.export import commands_train
    from edgeact.export.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser()
    commands_train.register(parser.add_subparsers())
    argv = ["train-reference", "--generate-demos", "3", "--generate-scenes", "2", "--demos", str(tmp_path / "demos"),
            str(tmp_path / "scenes"), "--out", str(tmp_path / "ckpt"), "--steps", "2", "--size", "tiny", "--batch-size",
            "2", "--threads", "1", "--pointing-batch", "2"]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "reference ARM" in out and "held-out accuracy: point" in out
    assert "from 2 episodes' first chunks of 2" in out
    scenes = json.loads((tmp_path / "scenes" / "manifest.json").read_text())
    assert scenes["seed"] == commands_train.SCENE_SEED_OFFSET and scenes["demo_config"]["first_chunk_only"]
    log = json.loads((tmp_path / "ckpt" / "training_log.json").read_text())
    demos_samples = json.loads((tmp_path / "demos" / "manifest.json").read_text())["samples"]
    assert log["train_samples"] + log["held_out_samples"] == demos_samples + 2
    assert log["options"]["pointing_batch"] == 2
    assert NORM_KEY in load_checkpoint(tmp_path / "ckpt").norm_stats
    assert (tmp_path / "ckpt" / commands_train.LOSS_PLOT).stat().st_size > 1000
    # Again: the same recording is reused (also one made before a DemoConfig field existed, which did what its
    # default does); an existing checkpoint needs --overwrite.
    manifest = json.loads((tmp_path / "demos" / "manifest.json").read_text())
    del manifest["demo_config"]["rotation_noise_rad"]
    (tmp_path / "demos" / "manifest.json").write_text(json.dumps(manifest))
    args = parser.parse_args(argv + ["--overwrite"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.count("reusing") == 2


def test_several_sets_train_together_with_the_first_sets_statistics(demos, tmp_path):
    # DAgger: the expert's set and a set of a policy's states, trained on together.
    import argparse
    import shutil

    from edgeact.drivers.sim.demos import MANIFEST, load_demos
    from edgeact.export import commands_train
    from edgeact.runtime.errors import ConfigError

    second = tmp_path / "second"
    shutil.copytree(demos, second)
    manifest = json.loads((second / MANIFEST).read_text())
    manifest["norm_stats"][NORM_KEY]["action"]["q99"] = [9.0] * 7      # another set's own statistics
    (second / MANIFEST).write_text(json.dumps(manifest))
    one, both = prepare(demos, TrainOptions(steps=1, **TINY)), prepare([demos, second], TrainOptions(steps=1, **TINY))
    n = len(one.arrays["rgb"])
    assert len(both.arrays["rgb"]) == 2 * n
    # Held out from the first set alone, the same episodes as without the second; the second trains but for its
    # samples of the held-out scenes (a copy: the same scenes, test_train_reference_guards.py).
    assert np.array_equal(both.held_idx, one.held_idx) and len(one.held_idx)
    assert np.array_equal(both.train_idx, np.concatenate([one.train_idx, n + one.train_idx]))
    assert not set(both.arrays["episode"][:n].tolist()) & set(both.arrays["episode"][n:].tolist())
    assert both.cfg.norm_stats == {NORM_KEY: load_demos(demos).norm_stats[NORM_KEY]}
    parser = argparse.ArgumentParser()
    commands_train.register(parser.add_subparsers())
    args = parser.parse_args(["train-reference", "--demos", str(demos), str(second), "--out", str(tmp_path / "c"),
                              "--generate-demos", "3"])
    assert args.demos == [demos, second]
    with pytest.raises(ConfigError, match="one --demos directory"):
        args.handler(args)
    args = parser.parse_args(["train-reference", "--demos", str(demos), "--out", str(tmp_path / "c"),
                              "--generate-scenes", "3"])
    with pytest.raises(ConfigError, match="second of two --demos"):
        args.handler(args)


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


def test_pointing_samples_ask_for_a_named_block_and_train_beside_the_batch(demos):
    from edgeact.drivers.sim.task import COLOURS

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    enc, a = trainer.encoder, trainer.arrays
    pairs = pointing_targets(a, np.arange(len(a["rgb"])))
    # Only visible blocks are pointed at; every visible one is.
    assert len(pairs) == int((a["blocks"][:, :, 0] >= 0).sum()) and np.all(a["blocks"][pairs[:, 0], pairs[:, 1], 0] >= 0)
    i, c = (int(v) for v in pairs[0])
    seq = enc.encode_pointing(a, i, c)
    assert np.array_equal(seq.ids[:seq.n_prompt], enc.prompt(f"point to the {COLOURS[c]} block", seq.image_inputs))
    answer = seq.labels[seq.n_prompt - 1:]
    assert np.all(seq.labels[:seq.n_prompt - 1] == IGNORE) and answer[-1] == enc.layout.bos_id
    text = enc.tokenizer.decode(answer[:-1].tolist(), skip_special_tokens=False)
    x, y = a["blocks"][i, c]
    assert text.strip() == f"[[{x}, {y}]]"
    digits = seq.kinds[seq.n_prompt - 1:] == 1            # the coordinates weigh as trace digits
    assert "".join(enc.tokenizer.decode([int(t)]) for t in answer[digits]) == f"{x}{y}"
    hidden = np.argwhere(a["blocks"][:, :, 0] < 0)
    if len(hidden):
        with pytest.raises(Exception, match="hidden"):
            enc.encode_pointing(a, int(hidden[0][0]), int(hidden[0][1]))

    report = train_reference(demos, None, TrainOptions(steps=3, pointing_batch=2, **TINY))
    assert len(report.losses) == 3 and all(np.isfinite(report.losses))
    assert 0.0 <= report.held_out_accuracy["point"] <= 1.0
    # The pointing loss adds to the batch's: the first step's loss (same weights, same batch) is larger with it.
    plain = train_reference(demos, None, TrainOptions(steps=1, **TINY)).losses[0]
    assert train_reference(demos, None, TrainOptions(steps=1, pointing_batch=2, **TINY)).losses[0] > plain
    with pytest.raises(Exception, match="pointing_batch"):
        TrainOptions(pointing_batch=-1)


def test_token_centres_say_which_image_token_shows_a_pixel(demos):
    from edgeact.export.train_reference_data import token_centres

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    pre = trainer.encoder.preprocessor
    height, width = 120, 160
    centres, grids = token_centres(pre, height, width)
    assert len(centres) == sum(r * c for r, c in grids)
    real = ~np.isnan(centres[:, 0])
    assert real.any() and np.all((centres[real] >= 0) & (centres[real] <= [width - 1, height - 1]))
    # A white square on black: the token it lights up most is the one whose centre is nearest, in every view.
    offsets = np.cumsum([0] + [r * c for r, c in grids])
    first_view = np.nonzero(real[:offsets[1]])[0]
    for token in (first_view[0], first_view[len(first_view) // 2], first_view[-1]):
        u, v = np.rint(centres[token]).astype(int)
        rgb = np.zeros((height, width, 3), np.uint8)
        rgb[max(v - 3, 0):v + 4, max(u - 3, 0):u + 4] = 255
        inputs = pre(rgb)
        light = (inputs.images.reshape(-1, inputs.images.shape[-1]) > 0.5).sum(axis=1)     # white values per patch
        idx = inputs.pooled_patches_idx
        per_token = np.where(idx >= 0, light[idx.clip(0)], 0).sum(axis=1)
        for k in range(len(grids)):
            view = slice(offsets[k], offsets[k + 1])
            nearest = np.nanargmin(np.abs(centres[view] - [u, v]).sum(axis=1))
            assert np.argmax(per_token[view]) == nearest, (u, v, k)


def test_grounding_labels_mark_the_token_of_each_visible_block():
    centres = np.array([[10.0, 10.0], [50.0, 10.0], [10.0, 50.0], [np.nan, np.nan],     # view 0 (2 x 2)
                        [10.0, 10.0], [50.0, 10.0], [10.0, 50.0], [50.0, 50.0]])        # view 1
    grids = ((2, 2), (2, 2))
    blocks = np.array([[255, 0], [-1, -1], [0, 255]])        # red at the top right; green hidden; blue bottom left
    labels = grounding_labels(blocks, centres, grids, width=61, height=61)
    assert labels.tolist() == [0, 1, 3, IGNORE, 0, 1, 3, 0]


def test_the_grounding_loss_trains_beside_the_pointing_samples(demos):
    options = dict(TINY, steps=1, pointing_batch=2)
    with_grounding = train_reference(demos, None, TrainOptions(grounding_weight=1.0, **options)).losses[0]
    assert with_grounding > train_reference(demos, None, TrainOptions(**options)).losses[0]
    report = train_reference(demos, None, TrainOptions(**dict(options, steps=3), grounding_weight=0.5))
    assert len(report.losses) == 3 and all(np.isfinite(report.losses))


def test_without_pointing_samples_the_grounding_loss_is_taken_on_the_answer_batch(demos, monkeypatch):
    from edgeact.export import train_reference as tr

    seen = []
    real = tr.Grounding.loss

    def spy(self, model, batch, blocks):
        seen.append((batch["input_ids"].shape[0], list(blocks)))
        return real(self, model, batch, blocks)

    monkeypatch.setattr(tr.Grounding, "loss", spy)
    options = dict(TINY, steps=1, batch_size=2)
    with_grounding = train_reference(demos, None, TrainOptions(grounding_weight=1.0, **options)).losses[0]
    assert with_grounding > train_reference(demos, None, TrainOptions(**options)).losses[0]
    assert len(seen) == 1 and seen[0][0] == 2 and len(seen[0][1]) == 2    # the step's two answer samples


def test_pointing_first_steps_train_on_pointing_samples_alone(demos):
    options = TrainOptions(**dict(TINY, steps=3, batch_size=2, pointing_batch=2, pointing_first_steps=2))
    trainer = prepare(demos, options)
    encoded = {"answers": 0, "points": 0}
    encode, encode_pointing = trainer.encoder.encode, trainer.encoder.encode_pointing

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            encoded[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    trainer.encoder.encode = count("answers", encode)
    trainer.encoder.encode_pointing = count("points", encode_pointing)
    losses = train_steps(trainer)
    # Steps 0 and 1 see pointing samples only; step 2 adds the batch of full answers.
    assert encoded == {"answers": 2, "points": 6} and len(losses) == 3 and all(np.isfinite(losses))
    for bad in (dict(pointing_first_steps=2), dict(pointing_first_steps=3, pointing_batch=2),
                dict(pointing_first_steps=-1, pointing_batch=2)):
        with pytest.raises(Exception, match="pointing_first_steps"):
            TrainOptions(**dict(TINY, steps=3, **bad))


def test_trace_end_error_compares_the_answer_with_a_constant_end_point(demos):
    from edgeact.export.train_reference import trace_end_error

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    a = trainer.arrays
    everything = np.arange(len(a["step"]))
    firsts = [int(i) for i in everything if a["step"][i] == 0]
    assert len(firsts) >= 2
    truth = {a["rgb"][i].tobytes(): a["trace"][i, :a["trace_len"][i]] for i in firsts}
    ends = np.array([a["trace"][i, a["trace_len"][i] - 1] for i in firsts], dtype=float)

    class Answer:
        def __init__(self, trace):
            self.trace = trace

    # An answer with the true trace is 0 off; one that always ends at the true ends' mean is the constant baseline.
    exact = trace_end_error(trainer, everything, answer_fn=lambda rgb, _: Answer(truth[rgb.tobytes()]))
    assert exact[0] == 0.0 and exact[1] > 0 and exact[2] == len(firsts)
    mean = trace_end_error(trainer, everything, answer_fn=lambda rgb, _: Answer(ends.mean(axis=0)[None]))
    assert mean[0] == pytest.approx(mean[1]) and mean[1] == exact[1]
    # Only first frames count, at most `frames` of them; none held out: nothing to say.
    assert trace_end_error(trainer, everything, frames=1, answer_fn=lambda rgb, _: Answer(ends[:1]))[2] == 1
    later = np.array([i for i in everything if a["step"][i] > 0])
    assert trace_end_error(trainer, later)[2] == 0
    # The real model answers greedily: a finite distance in trace units.
    model_error, _, frames = trace_end_error(trainer, everything, frames=2)
    assert frames == 2 and 0 <= model_error < 256 * 2 ** 0.5


def test_pointing_accuracy_counts_answers_nearest_the_named_block(demos, monkeypatch):
    import edgeact.export.generate as generate
    from edgeact.export.train_reference import pointing_accuracy

    trainer = prepare(demos, TrainOptions(steps=1, pointing_batch=2, **TINY))
    a, tok = trainer.arrays, trainer.encoder.tokenizer
    pairs = pointing_targets(a, np.arange(len(a["step"])))[:6]
    answers = iter([])

    class Result:
        def __init__(self, text):
            self.token_ids = tok.encode(text).ids

    monkeypatch.setattr(generate, "generate_greedy", lambda *args, **kwargs: Result(next(answers)))
    # A few units off the named block still finds it; no numbers is a miss.
    answers = iter(f" [[{min(a['blocks'][i, c, 0] + 2, 255)}, {a['blocks'][i, c, 1]}]]" for i, c in pairs)
    assert pointing_accuracy(trainer, pairs) == 1.0
    answers = iter(" [[" for _ in pairs)
    assert pointing_accuracy(trainer, pairs) == 0.0
    # Pointing at another visible block is a miss.
    others = [(i, c, next((k for k in range(3) if k != c and a["blocks"][i, k, 0] >= 0), None)) for i, c in pairs]
    others = [(i, c, k) for i, c, k in others if k is not None]
    assert others
    answers = iter(f" [[{a['blocks'][i, k, 0]}, {a['blocks'][i, k, 1]}]]" for i, _, k in others)
    assert pointing_accuracy(trainer, np.array([[i, c] for i, c, _ in others])) == 0.0


def test_trace_only_samples_ask_for_the_trace_alone(demos):
    from edgeact.export.train_reference_data import TRACE_TEMPLATE

    trainer = prepare(demos, TrainOptions(steps=1, trace_batch=2, **TINY))
    enc, a = trainer.encoder, trainer.arrays
    i = int(np.argmax(a["trace_len"]))
    seq = enc.encode_trace(a, i)
    image_inputs = enc.image_inputs(a["rgb"][i])
    question = TRACE_TEMPLATE.format(instruction=str(a["instruction"][i]))
    assert np.array_equal(seq.ids[:seq.n_prompt], enc.prompt(question, image_inputs))
    answer = seq.labels[seq.n_prompt - 1:]
    assert np.all(seq.labels[:seq.n_prompt - 1] == IGNORE) and answer[-1] == enc.layout.bos_id
    points = a["trace"][i][:a["trace_len"][i]].tolist()
    assert enc.tokenizer.decode(answer[:-1].tolist(), skip_special_tokens=False).strip() == str(points)
    # The same tokens as the full answer's trace: the full answer holds this answer's ids (end-of-text aside).
    full = enc.grammar.to_ids(enc.answer(a, i)).tolist()
    body = answer[1:-3].tolist()                  # from the first digit to the last (before "]", "]", end-of-text)
    assert any(full[k:k + len(body)] == body for k in range(len(full)))
    assert set(seq.kinds[seq.n_prompt - 1:][np.isin(answer, enc.layout.digit_ids)]) == {KINDS.index("trace")}

    report = train_reference(demos, None, TrainOptions(steps=2, trace_batch=2, **TINY))
    assert len(report.losses) == 2 and all(np.isfinite(report.losses))
    plain = train_reference(demos, None, TrainOptions(steps=1, **TINY)).losses[0]
    assert train_reference(demos, None, TrainOptions(steps=1, trace_batch=2, **TINY)).losses[0] > plain
    with pytest.raises(Exception, match="trace_batch"):
        TrainOptions(trace_batch=-1)


def test_soft_action_targets_make_a_near_bin_cheaper_than_a_far_one():
    from edgeact.export.train_reference import weighted_loss

    action_ids = torch.arange(100, 356)                      # 256 action ids in bin order
    action, trace = KINDS.index("action"), KINDS.index("trace")
    batch = {"labels": torch.tensor([[5, 200, 7]]), "kinds": torch.tensor([[trace, action, -1]])}
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])

    def peaked(at: int) -> torch.Tensor:
        logits = torch.zeros(1, 3, 400)
        logits[0, 0, 5] = logits[0, 1, at] = 8.0
        return logits

    near, far = peaked(201), peaked(300)
    hard = [weighted_loss(x, batch, weights) for x in (near, far)]
    assert hard[0] == pytest.approx(hard[1])                 # one bin: a near miss costs as much as a far one
    soft = [weighted_loss(x, batch, weights, action_ids=action_ids, action_sigma=3.0) for x in (near, far)]
    assert soft[0] < soft[1] - 0.25
    # A vanishing width is the one-bin loss again; the trace token's loss is untouched either way.
    assert weighted_loss(far, batch, weights, action_ids=action_ids, action_sigma=1e-3) == pytest.approx(hard[1])
    with pytest.raises(Exception, match="action_sigma"):
        TrainOptions(action_sigma=-1.0)


def test_the_connector_init_starts_the_image_features_above_the_token_embeddings(demos):
    from edgeact.runtime.errors import ConfigError

    def scales(trainer):
        a = trainer.arrays
        inputs = trainer.encoder.image_inputs(a["rgb"][0])
        with torch.no_grad():
            features = trainer.model.image_features(torch.from_numpy(inputs.images), torch.from_numpy(inputs.image_masks),
                                                    torch.from_numpy(inputs.pooled_patches_idx))
            embeddings = trainer.model.embed(torch.arange(100)[None])
        return float(features.pow(2).mean().sqrt()), float(embeddings.pow(2).mean().sqrt())

    # PyTorch's default init shrinks each linear layer's output, and the projector's gate multiplies two such
    # outputs: the image features start far below the token embeddings they are added to.
    feature, embedding = scales(prepare(demos, TrainOptions(steps=1, **TINY)))      # the recipe's default
    assert feature < 0.5 * embedding
    trainer = prepare(demos, TrainOptions(steps=1, connector_init="variance", **TINY))
    variance, same_embedding = scales(trainer)
    assert same_embedding == embedding and variance > 2 * embedding and variance > 8 * feature
    # Only the connector's linear layers are redrawn: the ViT and the decoder keep the seeded default init.
    default = prepare(demos, TrainOptions(steps=1, connector_init="torch", **TINY)).model.state_dict()
    for name, tensor in trainer.model.state_dict().items():
        redrawn = "image_pooling_2d" in name or "image_projector" in name
        assert torch.equal(tensor, default[name]) != (redrawn and name.endswith("weight")), name
    with pytest.raises(ConfigError, match="connector_init"):
        TrainOptions(connector_init="xavier")


def test_image_reliance_is_equal_for_a_model_blind_to_the_image(demos):
    from edgeact.export.train_reference import image_reliance

    # Untrained, with image features as large as the token embeddings (the variance init): the answer's loss
    # changes with another scene's frame (by ~1e-3 nats on these demos; blind, below by 1e-6).
    trainer = prepare(demos, TrainOptions(steps=1, connector_init="variance", **TINY))
    everything = np.arange(len(trainer.arrays["step"]))
    own, other = image_reliance(trainer, everything)
    assert np.isfinite(own) and abs(own - other) > 1e-4
    # With the projector's output zeroed every image feature is 0: the answer cannot depend on the frame.
    with torch.no_grad():
        trainer.model.vision.image_projector.w2.weight.zero_()
    blind_own, blind_other = image_reliance(trainer, everything)
    assert blind_own == pytest.approx(blind_other, abs=1e-6)


def test_the_table_calls_the_image_used_only_when_its_own_frame_saves_loss():
    from edgeact.export.commands_train import image_use_note

    # The committed CPU-trained model (1.8749 / 1.8757) and a GPU-trained one (1.915 / 2.914), as measured.
    assert image_use_note(1.8749, 1.8757).endswith("the image is ignored")
    assert image_use_note(1.915, 2.914) == "the image is used: its own frame saves 0.999 nats"
    # Another scene's frame doing better is no use of the image either.
    assert image_use_note(2.0, 1.5).endswith("the image is ignored")


def test_image_reliance_swaps_in_a_frame_of_another_scene():
    from edgeact.export.train_reference import other_scene_partners
    from edgeact.runtime.errors import ConfigError

    episodes = np.array([0, 0, 0, 0, 0, 0, 1, 2])
    partners = other_scene_partners(episodes, np.arange(8))
    assert (episodes[partners] != episodes).all()
    assert partners.tolist() == [6, 6, 6, 7, 6, 6, 2, 3]      # half the samples on, then past the same episode
    with pytest.raises(ConfigError, match="2 episodes or more"):
        other_scene_partners(np.zeros(5, dtype=int), np.arange(5))


def test_feature_decay_holds_the_image_features_down(demos):
    def feature_rms(feature_decay):
        trainer = prepare(demos, TrainOptions(steps=6, feature_decay=feature_decay, **TINY))
        train_steps(trainer)
        inputs = trainer.encoder.image_inputs(trainer.arrays["rgb"][0])
        with torch.no_grad():
            features = trainer.model.image_features(torch.from_numpy(inputs.images), torch.from_numpy(inputs.image_masks),
                                                    torch.from_numpy(inputs.pooled_patches_idx))
        return float(features.pow(2).mean().sqrt())

    # Same seed, same batches: only the penalty differs, and it pulls the features toward 0.
    assert feature_rms(100.0) < 0.7 * feature_rms(0.0)
    from edgeact.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="feature_decay"):
        TrainOptions(feature_decay=-1.0)


def test_depth_input_noise_replaces_fed_depth_codes_but_not_their_labels(demos):
    from edgeact.export.train_reference import corrupt_answer_inputs

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    sequence = trainer.encoder.encode(trainer.arrays, 0)
    depth_ids = np.asarray(trainer.encoder.layout.depth_code_ids)
    fed = (np.arange(len(sequence.ids)) >= sequence.n_prompt) & np.isin(sequence.ids, depth_ids)
    assert fed.sum() == 100         # every code the answer holds is also fed, to predict what follows it
    rng = np.random.default_rng(0)
    assert np.array_equal(corrupt_answer_inputs(sequence, depth_ids, 0.0, rng).ids, sequence.ids)
    noisy = corrupt_answer_inputs(sequence, depth_ids, 0.5, rng)
    changed = noisy.ids != sequence.ids
    assert not changed[~fed].any() and 25 < changed.sum() < 75 and np.isin(noisy.ids[fed], depth_ids).all()
    assert np.array_equal(noisy.labels, sequence.labels) and np.array_equal(noisy.kinds, sequence.kinds)
    assert noisy.image_inputs is sequence.image_inputs
    # In training: same seed, the noise changes the losses; off, nothing changes.
    losses = [train_steps(prepare(demos, TrainOptions(steps=2, depth_input_noise=p, **TINY))) for p in (0.0, 0.0, 1.0)]
    assert losses[0] == losses[1] != losses[2]
    from edgeact.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="depth_input_noise"):
        TrainOptions(depth_input_noise=1.5)


def test_trace_input_noise_replaces_fed_trace_digits_only(demos):
    from edgeact.export.train_reference import corrupt_answer_inputs

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    sequence = trainer.encoder.encode(trainer.arrays, 0)
    digit_ids = np.asarray(trainer.encoder.layout.digit_ids)
    answer = np.arange(len(sequence.ids)) >= sequence.n_prompt
    # The answer's digits fed as inputs are the trace's: each is the label of the position before it.
    fed = answer & np.isin(sequence.ids, digit_ids)
    assert fed.any() and (sequence.kinds[np.flatnonzero(fed) - 1] == KINDS.index("trace")).all()
    noisy = corrupt_answer_inputs(sequence, digit_ids, 1.0, np.random.default_rng(0))
    changed = noisy.ids != sequence.ids
    assert not changed[~fed].any() and changed.sum() >= 0.7 * fed.sum()      # 1 in 10 draws its own digit back
    assert np.isin(noisy.ids[fed], digit_ids).all() and np.array_equal(noisy.labels, sequence.labels)
    losses = [train_steps(prepare(demos, TrainOptions(steps=2, trace_input_noise=p, **TINY))) for p in (0.0, 0.0, 1.0)]
    assert losses[0] == losses[1] != losses[2]
    from edgeact.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="trace_input_noise"):
        TrainOptions(trace_input_noise=-0.1)


def test_the_target_probe_reads_the_named_blocks_place_at_the_answers_trace_and_action_positions(demos):
    from edgeact.drivers.sim.task import COLOURS
    from edgeact.export.train_reference import TargetProbe

    trainer = prepare(demos, TrainOptions(steps=1, target_probe_weight=1.0, **TINY))
    probe = TargetProbe(trainer)
    arrays = trainer.arrays
    for i in range(len(arrays["instruction"])):         # the named block's bins, or IGNORE where it is hidden
        colour = [c for c in COLOURS if c in str(arrays["instruction"][i])]
        place = arrays["blocks"][i][COLOURS.index(colour[0])]
        expected = place * 16 // 256 if place[0] >= 0 else [IGNORE, IGNORE]
        assert list(probe.bins[i]) == list(expected)
    samples = [0, 1]
    batch = collate([trainer.encoder.encode(arrays, i) for i in samples], trainer.encoder.layout.bos_id)
    hidden = torch.zeros(*batch["input_ids"].shape, trainer.cfg.llm_config.hidden_size, requires_grad=True)
    probe.loss(hidden, batch, samples).backward()
    # Only the positions that predict a trace digit or an action token are read.
    read = hidden.grad.abs().sum(-1) > 0
    kinds = batch["kinds"]
    answer_moves = ((kinds == KINDS.index("trace")) | (kinds == KINDS.index("action"))) & (batch["labels"] != IGNORE)
    visible = torch.tensor([probe.bins[i][0] != IGNORE for i in samples])[:, None]
    assert torch.equal(read, answer_moves & visible) and read.any()
    # A head that reads the right bins has a lower loss than one that cannot.
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.zero_()
        blind = float(probe.loss(hidden.detach(), batch, samples))
    assert blind == pytest.approx(np.log(16), rel=1e-5)
    # In training: the same seed with the probe on changes the weights' path; it is not saved with the checkpoint.
    losses = [train_steps(prepare(demos, TrainOptions(steps=2, target_probe_weight=w, **TINY))) for w in (0.0, 1.0)]
    assert losses[0][0] < losses[1][0] and all(np.isfinite(losses[1]))
    from edgeact.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="target_probe_weight"):
        TrainOptions(target_probe_weight=-1.0)
    trainer.arrays = dict(arrays, instruction=np.array(["wave"] + list(arrays["instruction"][1:])))
    with pytest.raises(ConfigError, match="sample 0's instruction 'wave' names no one block"):
        TargetProbe(trainer)


def test_the_command_defaults_are_the_options_own():
    """The CLI keeps literal copies of TrainOptions' defaults (importing it would pull torch into `edgeact --help`):
    an option whose default changes in one place only would train another recipe from the command line."""
    import argparse
    import dataclasses

    from edgeact.export import commands_train
    from edgeact.export.train_reference import CONNECTOR_INITS

    parser = argparse.ArgumentParser()
    commands_train.register(parser.add_subparsers())
    args = parser.parse_args(["train-reference", "--demos", "d", "--out", "o"])
    defaults = TrainOptions()
    cli = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "size": args.size,
           "pointing_batch": args.pointing_batch, "grounding_weight": args.grounding_weight,
           "trace_batch": args.trace_batch, "action_sigma": args.action_sigma, "connector_init": args.connector_init,
           "feature_decay": args.feature_decay, "depth_input_noise": args.depth_input_noise,
           "target_probe_weight": args.target_probe, "trace_input_noise": args.trace_input_noise,
           "device": args.device, "loader_workers": args.loader_workers, "init": args.init,
           "colour_swap": args.colour_swap}
    assert cli == {name: getattr(defaults, name) for name in cli}
    for init in CONNECTOR_INITS:            # every init the options take, the command takes
        assert parser.parse_args(["train-reference", "--demos", "d", "--out", "o", "--connector-init", init]
                                 ).connector_init == init
    assert set(cli) <= {f.name for f in dataclasses.fields(TrainOptions)}


def test_a_colour_swap_exchanges_the_frames_blocks_and_the_instructions_word_but_not_the_answer(demos):
    from edgeact.drivers.sim.recolour import PERMUTATIONS, recolour_frame, recolour_instruction
    from edgeact.drivers.sim.task import COLOURS

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    encoder, arrays = trainer.encoder, trainer.arrays
    i = int(trainer.train_idx[0])
    plain = encoder.encode(arrays, i)
    for swap, permutation in enumerate(PERMUTATIONS):
        swapped = encoder.encode(arrays, i, swap)
        answer = slice(plain.n_prompt - 1, None)
        assert np.array_equal(swapped.labels[answer], plain.labels[answer])        # no block moved: same answer
        instruction = recolour_instruction(str(arrays["instruction"][i]), permutation)
        named = next(k for k, c in enumerate(COLOURS) if c in str(arrays["instruction"][i]))
        assert (instruction != str(arrays["instruction"][i])) == (permutation[named] != named)
        expected = encoder.prompt(instruction, encoder.image_inputs(recolour_frame(arrays["rgb"][i], permutation)))
        assert np.array_equal(swapped.ids[:swapped.n_prompt], expected)
        assert np.array_equal(swapped.image_inputs.images,
                              encoder.image_inputs(recolour_frame(arrays["rgb"][i], permutation)).images)
        assert not np.array_equal(swapped.image_inputs.images, plain.image_inputs.images)


def test_colour_swaps_are_drawn_up_front_and_off_by_default():
    from edgeact.drivers.sim.recolour import PERMUTATIONS
    from edgeact.export.train_reference import colour_swaps

    batches = [[0, 1, 2, 3]] * 200
    assert all(swap == -1 for batch in colour_swaps(batches, 0.0, 0) for _, swap in batch)
    drawn = colour_swaps(batches, 0.75, [0, 5])
    assert drawn == colour_swaps(batches, 0.75, [0, 5])                       # seeded
    assert [[i for i, _ in batch] for batch in drawn] == batches              # the samples and their order kept
    swaps = np.array([swap for batch in drawn for _, swap in batch])
    assert 0.70 < np.mean(swaps >= 0) < 0.80
    assert set(swaps[swaps >= 0]) == set(range(len(PERMUTATIONS)))
    from edgeact.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="colour_swap"):
        TrainOptions(colour_swap=1.5)


def test_colour_swapped_training_is_the_same_with_loader_workers(demos):
    def run(workers):
        trainer = prepare(demos, TrainOptions(steps=3, loader_workers=workers, colour_swap=1.0, **TINY))
        return train_steps(trainer), trainer.model.state_dict()

    (loss_a, a), (loss_b, b) = run(0), run(2)
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)
    plain = train_steps(prepare(demos, TrainOptions(steps=3, **TINY)))
    assert plain != loss_a                  # the swapped frames and words were what trained


def test_the_grounding_labels_follow_a_colour_swap(demos, monkeypatch):
    """With the blocks' colours exchanged in the frame, the grounding loss must call each block by its new colour:
    the rows it is given are the recorded ones exchanged, and each names the colour the swapped frame shows there."""
    from edgeact.drivers.sim.recolour import PERMUTATIONS, block_masks, recolour_frame
    from edgeact.export import train_reference as tr

    seen = []
    real = tr.Grounding.loss

    def spy(self, model, batch, blocks):
        seen.append([np.asarray(row).copy() for row in blocks])
        return real(self, model, batch, blocks)

    monkeypatch.setattr(tr.Grounding, "loss", spy)
    options = TrainOptions(**dict(TINY, steps=2, batch_size=2), grounding_weight=1.0, colour_swap=1.0)
    trainer = prepare(demos, options)
    train_steps(trainer)
    batches = tr.Draws(trainer.train_idx, options.seed)
    swaps = tr.colour_swaps([batches.take(2) for _ in range(2)], 1.0, [options.seed, 5])
    arrays = trainer.arrays
    checked = 0
    for step, rows in zip(swaps, seen, strict=True):
        for (i, swap), row in zip(step, rows, strict=True):
            assert swap >= 0 and np.array_equal(row, tr.shown_blocks(arrays, i, swap))
            frame = recolour_frame(arrays["rgb"][i], PERMUTATIONS[swap])
            masks = block_masks(frame)
            height, width = frame.shape[:2]
            for colour, (x, y) in enumerate(row):
                if x >= 0:
                    px, py = round(x / 255 * (width - 1)), round(y / 255 * (height - 1))
                    assert masks[py, px] == colour
                    checked += 1
    assert checked >= 3


def test_a_diverged_model_is_never_written(demos, tmp_path):
    """NaN weights would load, export and verify against themselves: the checkpoint is refused instead."""
    from edgeact.export.train_reference import TrainReport, save
    from edgeact.runtime.errors import ConfigError

    trainer = prepare(demos, TrainOptions(steps=1, **TINY))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(ConfigError, match=r"training diverged: 1 of \d+ weight tensors hold NaN or inf .*nothing was "
                                          r"written .*lower --lr"):
        save(trainer, tmp_path / "ckpt", TrainReport(None, 0, 0, 0))
    assert not (tmp_path / "ckpt").exists()


def test_a_recording_of_an_older_demo_format_is_not_reused(tmp_path):
    """Demonstrations recorded before their labels followed the camera (format 2) are not taken for the recipe's."""
    from dataclasses import asdict

    from rich.console import Console

    from edgeact.drivers.sim.demos import FORMAT, DemoConfig
    from edgeact.export.commands_train import DEMO_EXECUTION_NOISE, DEMO_STRIDE, _record
    from edgeact.runtime.errors import ConfigError

    demos = tmp_path / "demos"
    demos.mkdir()
    config = DemoConfig(stride_actions=DEMO_STRIDE, execution_noise=DEMO_EXECUTION_NOISE)
    (demos / "manifest.json").write_text(json.dumps({"format": "edgeact-sim-demos/2", "episodes_attempted": 3,
                                                     "seed": 0, "demo_config": asdict(config), "samples": 9}))
    assert FORMAT != "edgeact-sim-demos/2"
    with pytest.raises(ConfigError, match=rf"holds another recording .*format edgeact-sim-demos/2\), not 3 from 0 .*"
                                          rf"format {FORMAT}; give another --demos or delete it"):
        _record(demos, 3, 0, Console(file=None))
