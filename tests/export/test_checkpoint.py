"""Checkpoint writing and loading: the published file format, exact round trips, atomic writes, and clear errors."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgeact.export import checkpoint as ckpt_mod
from edgeact.export.checkpoint import load_checkpoint, load_model, save_checkpoint
from edgeact.export.synthetic import make_checkpoint, synthetic_config, synthetic_preprocess_config, synthetic_tensors, synthetic_tokenizer
from edgeact.export.tensor_names import expected_tensor_shapes
from edgeact.runtime.errors import CheckpointError

SEED = 7
INDEX = "model.safetensors.index.json"


def _shard(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Pristine tiny checkpoints, written once: (variant, shards) -> directory. Tests copy before damaging."""
    root = tmp_path_factory.mktemp("ckpts")
    return {(v, n): make_checkpoint(v, "tiny", SEED, root / f"{v}{n}", shards=n) for v in "DO" for n in (1, 3)}


@pytest.fixture
def broken(made, tmp_path):
    """A fresh copy of a pristine checkpoint, to damage in one way."""
    import shutil

    def copy(variant: str = "D", shards: int = 3) -> Path:
        dst = tmp_path / f"copy{variant}{shards}"
        shutil.copytree(made[(variant, shards)], dst)
        return dst
    return copy


# --------------------------------------------------------------------------- round trips


def _prompt_and_images(ckpt):
    """A real preprocessed camera frame and a prompt with one <im_patch> per real pooled token."""
    from edgeact.runtime.preprocess import ImagePreprocessor
    from edgeact.runtime.token_layout import TokenLayout, load_tokenizer

    rgb = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    inputs = ImagePreprocessor(ckpt.config, ckpt.preprocess_config)(rgb)
    layout = TokenLayout.from_file(ckpt.tokenizer_path)
    n_real = int((inputs.pooled_patches_idx >= 0).any(-1).sum())
    text = load_tokenizer(ckpt.tokenizer_path).encode("User: pick up the red cup Assistant:", add_special_tokens=False).ids
    ids = [layout.bos_id, layout.im_start_id, *[layout.im_patch_id] * n_real, layout.im_end_id, *text]
    return (torch.tensor(ids), torch.tensor(inputs.images), torch.tensor(inputs.image_masks),
            torch.tensor(inputs.pooled_patches_idx))


@pytest.mark.parametrize("variant", ["D", "O"])
@pytest.mark.parametrize("shards", [1, 3])
def test_reload_gives_identical_tensors_and_logits(made, variant, shards):
    from edgeact.export.generate import forward_logits
    from edgeact.export.model import MolmoActModel

    path = made[(variant, shards)]
    model, ckpt = load_model(path)
    cfg = synthetic_config(variant, "tiny")
    written = synthetic_tensors(cfg, SEED)
    assert list(ckpt.tensors) == list(written)
    assert all(torch.equal(ckpt.tensors[k], written[k]) for k in written)
    assert ckpt.config.to_dict() == cfg.to_dict()
    assert ckpt.norm_stats == cfg.norm_stats and ckpt.preprocess_config == synthetic_preprocess_config(cfg)

    reference = MolmoActModel(cfg).eval()
    reference.load_state_dict(written, strict=True)
    inputs = _prompt_and_images(ckpt)
    logits = forward_logits(model, *inputs)
    assert logits.shape == (inputs[0].shape[0], cfg.llm_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, forward_logits(reference, *inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_as_stored_or_cast(tmp_path, dtype):
    path = make_checkpoint("O", "tiny", SEED, tmp_path / "half", dtype=dtype)
    fp32 = synthetic_tensors(synthetic_config("O", "tiny"), SEED)
    stored = load_checkpoint(path).tensors
    cast = load_checkpoint(path, dtype=torch.float32).tensors
    for name, t in fp32.items():
        assert stored[name].dtype == dtype and torch.equal(stored[name], t.to(dtype))
        assert cast[name].dtype == torch.float32 and torch.equal(cast[name], t.to(dtype).float())
    model, _ = load_model(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --------------------------------------------------------------------------- the published format


@pytest.mark.parametrize("variant", ["D", "O"])
@pytest.mark.parametrize("shards", [1, 3])
def test_files_follow_the_published_layout(made, variant, shards, tmp_path):
    path = made[(variant, shards)]
    cfg = synthetic_config(variant, "tiny")
    expected = expected_tensor_shapes(cfg)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "molmoact" and config["architectures"] == ["MolmoActForActionReasoning"]
    assert {"vit_config", "adapter_config", "llm_config", "image_patch_id", "n_action_bins", "norm_stats"} <= set(config)
    assert {"image_num_pos", "use_cls_token", "patch_bias", "pre_layernorm", "hidden_act"} <= set(config["vit_config"])
    assert set(config["adapter_config"]) == {       # exactly the published keys (MOLMOACT_FORMAT.md)
        "vit_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "float32_attention",
        "hidden_act", "intermediate_size", "text_hidden_size", "image_padding_embed"}
    assert {"vocab_size", "additional_vocab_size", "qkv_bias", "use_qk_norm", "norm_after", "rope_theta"} <= set(config["llm_config"])
    assert json.loads((path / "preprocessor_config.json").read_text())["max_crops"] >= 1
    assert (path / "tokenizer.json").read_bytes() == _saved_tokenizer(tmp_path).read_bytes()

    if shards == 1:
        files = [path / "model.safetensors"]
        assert not (path / INDEX).exists()
    else:
        files = [path / _shard(i, shards) for i in range(1, shards + 1)]
        assert not (path / "model.safetensors").exists()
        index = json.loads((path / INDEX).read_text())
        assert set(index) == {"metadata", "weight_map"}
        assert set(index["weight_map"]) == set(expected)
        assert set(index["weight_map"].values()) == {f.name for f in files}
        assert index["metadata"]["total_size"] == sum(4 * int(np.prod(s)) for s in expected.values())
    names = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for k in handle.keys():
                names[k] = tuple(handle.get_slice(k).get_shape())
                if shards > 1:
                    assert index["weight_map"][k] == f.name
    assert names == {k: tuple(s) for k, s in expected.items()}
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.json", "tokenizer.json", "preprocessor_config.json", *(f.name for f in files)] + ([INDEX] if shards > 1 else []))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only mode
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in path.iterdir())


def _saved_tokenizer(tmp: Path) -> Path:
    out = tmp / "reference_tokenizer.json"
    synthetic_tokenizer().save(str(out))
    return out


def test_max_shard_bytes_starts_a_new_shard_when_the_next_tensor_would_overflow(tmp_path):
    cfg = synthetic_config("D", "tiny")
    tensors = synthetic_tensors(cfg, SEED)
    limit = 64 * 1024
    path = save_checkpoint(tmp_path / "ck", cfg, tensors, synthetic_tokenizer(), synthetic_preprocess_config(cfg), limit)
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    n = len(set(weight_map.values()))
    assert n > 1 and set(weight_map.values()) == {_shard(i, n) for i in range(1, n + 1)}
    for i in range(1, n + 1):
        sizes = [t.numel() * 4 for t in load_file(path / _shard(i, n)).values()]
        assert sum(sizes) <= limit or len(sizes) == 1
    assert all(torch.equal(load_checkpoint(path).tensors[k], tensors[k]) for k in tensors)


def test_same_seed_gives_identical_bytes_and_another_seed_other_weights(made, tmp_path):
    again = make_checkpoint("O", "tiny", SEED, tmp_path / "again", shards=3)
    other = make_checkpoint("O", "tiny", SEED + 1, tmp_path / "other", shards=3)
    first = made[("O", 3)]
    for f in first.iterdir():
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name
    assert (other / _shard(1, 3)).read_bytes() != (first / _shard(1, 3)).read_bytes()
    assert (other / "config.json").read_bytes() == (first / "config.json").read_bytes()


# --------------------------------------------------------------------------- atomic writes


def _save_tiny(out: Path, **kw) -> Path:
    cfg = synthetic_config("D", "tiny")
    return save_checkpoint(out, cfg, synthetic_tensors(cfg, SEED), synthetic_tokenizer(), synthetic_preprocess_config(cfg), **kw)


def _fail_on_second_shard(monkeypatch):
    calls = []
    real = ckpt_mod.save_file

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(ckpt_mod, "save_file", flaky)
    return calls


def test_a_failed_write_leaves_no_directory_behind(tmp_path, monkeypatch):
    calls = _fail_on_second_shard(monkeypatch)
    parent = tmp_path / "exports"
    with pytest.raises(OSError, match="disk full"):
        _save_tiny(parent / "ck", n_shards=3)
    assert len(calls) == 2  # it did fail mid-write, after one shard was complete
    assert list(parent.iterdir()) == []


def test_a_failed_overwrite_keeps_the_old_checkpoint(made, broken, monkeypatch):
    path = broken("D", 3)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    _fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError):
        _save_tiny(path, n_shards=2, overwrite=True)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_overwrite_is_refused_unless_asked(broken):
    path = broken("D", 3)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: already exists and is not empty")):
        _save_tiny(path)
    _save_tiny(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_bad_tensors_are_refused_before_anything_is_written(tmp_path):
    cfg = synthetic_config("D", "tiny")
    tensors = synthetic_tensors(cfg, SEED)
    del tensors["lm_head.weight"]
    with pytest.raises(CheckpointError, match="1 tensor.*missing.*lm_head.weight"):
        save_checkpoint(tmp_path / "ck", cfg, tensors, synthetic_tokenizer(), synthetic_preprocess_config(cfg))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad checkpoints


def _edit_config(path: Path, edit) -> None:
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_directory_config_and_tokenizer(broken, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: checkpoint directory not found"):
        load_checkpoint(tmp_path / "nowhere")
    path = broken()
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not found"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_checkpoint(path)


def test_missing_weights(broken):
    path = broken("D", 1)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        load_checkpoint(path)


def test_missing_tensors_are_listed_with_a_count(broken):
    path = broken("D", 1)
    gone = ["lm_head.weight", "model.transformer.ln_f.weight", "model.transformer.blocks.1.mlp.ff_out.weight",
            "model.transformer.blocks.0.mlp.ff_out.weight", "model.transformer.blocks.0.ff_norm.weight"]
    _rewrite(path / "model.safetensors", lambda t: [t.pop(k) for k in gone])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "model.safetensors: 5 tensor(s) missing" in msg and "and 2 more" in msg
    assert sum(k in msg for k in gone) == 3


def test_unexpected_tensor_names_its_shard(broken):
    path = broken("O", 3)
    _rewrite(path / _shard(2, 3), lambda t: t.update({"model.transformer.blocks.9.mlp.ff_out.weight": torch.zeros(2)}))
    index = json.loads((path / INDEX).read_text())
    index["weight_map"]["model.transformer.blocks.9.mlp.ff_out.weight"] = _shard(2, 3)
    (path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{_shard(2, 3)}: 1 unexpected tensor(s)") + ".*blocks.9.mlp.ff_out.weight"):
        load_checkpoint(path)


def test_shape_mismatch_names_file_key_and_both_shapes(broken):
    path = broken("D", 3)
    index = json.loads((path / INDEX).read_text())
    name = "model.transformer.blocks.1.mlp.ff_out.weight"
    shard = index["weight_map"][name]
    _rewrite(path / shard, lambda t: t.update({name: torch.zeros(64, 100)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: {name} has shape (64, 100), config expects (64, 128)")):
        load_checkpoint(path)


def test_unknown_variant_surfaces(broken):
    path = broken()
    _edit_config(path, lambda c: c["vit_config"].update(use_cls_token=True))  # CLS without OLMo2's QK-norm
    with pytest.raises(CheckpointError, match=r"config\.json: unknown variant"):
        load_checkpoint(path)


def test_truncated_shard_is_named(broken):
    path = broken("D", 3)
    shard = path / _shard(3, 3)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: truncated or corrupt safetensors file") + ".*re-download or re-export"):
        load_checkpoint(path)


def test_index_referencing_a_missing_shard(broken):
    path = broken("O", 3)
    (path / _shard(2, 3)).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{INDEX}: references shard {_shard(2, 3)}") + ".*missing"):
        load_checkpoint(path)


def test_index_and_shard_disagreeing(broken):
    path = broken("O", 3)
    index = json.loads((path / INDEX).read_text())
    name = next(k for k, f in index["weight_map"].items() if f == _shard(1, 3))
    index["weight_map"][name] = _shard(2, 3)
    (path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{_shard(1, 3)}: holds {name}, which the index does not map to it")):
        load_checkpoint(path)
    index["weight_map"][name] = _shard(1, 3)
    index["weight_map"]["model.transformer.extra.weight"] = _shard(2, 3)
    (path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{_shard(2, 3)}: the index maps model.transformer.extra.weight to this shard, which lacks")):
        load_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop("q99"), r"lacks \['q99'\]"),
    (lambda a: a.update(mask=a["mask"][:6]), "different lengths"),
    (lambda a: a.update(q01=a["q01"] + [0.0]), "different lengths"),
    (lambda a: a.update(q99=a["q99"][:-1] + ["inf"]), "non-number"),
    (lambda a: a.update({k: v[:6] for k, v in a.items() if isinstance(v, list)}), "has 6 dimensions; MolmoAct's actions "
                                                                                   "have 7"),
    (lambda a: a.update(q01=a["q99"], q99=a["q01"]), r"has q01 > q99 in dimensions \[0, 1, 2, 3, 4, 5, 6\]: swapped"),
    (lambda a: a.update(mask=["yes"] * 7), "mask'\\] must be true / false values"),
])
def test_bad_norm_stats(broken, edit, message):
    path = broken()
    _edit_config(path, lambda c: edit(c["norm_stats"]["edgeact_sim"]["action"]))
    with pytest.raises(CheckpointError, match=r"config\.json: norm_stats\['edgeact_sim'\]\['action'\].*" + message):
        load_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(n_action_bins=128), "n_action_bins 128, but MolmoAct's actions are 256 bins"),
    (lambda c: c["llm_config"].update(rope_theta=-1.0), r"llm_config.rope_theta is -1.0; it must be a positive"),
    (lambda c: c["vit_config"].update(layer_norm_eps=0.0), r"vit_config.layer_norm_eps is 0.0; it must be a positive"),
    (lambda c: c["llm_config"].update(max_position_embeddings=0), r"llm_config.max_position_embeddings is 0; it must"),
])
def test_config_values_that_cannot_be_right_are_named_before_the_weights_load(broken, edit, message):
    path = broken()
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load_checkpoint(path)


def test_a_tokenizer_of_another_checkpoint_is_refused(broken):
    """The prompt's <im_patch> id must be the one the model adds image features to, and every id the answer chooses
    must be a row of the LM head: both found at load, not after a whole export (or on the robot)."""
    path = broken()
    _edit_config(path, lambda c: c.update(image_patch_id=c["image_patch_id"] + 1))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json has <im_patch> at id \d+ but .*config\.json says "
                                              r"image_patch_id \d+; they come from different checkpoints"):
        load_checkpoint(path)
    path = broken(shards=1)
    _edit_config(path, lambda c: c["llm_config"].update(vocab_size=900))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json has depth codes at ids \d+\.\.\d+.*outside the LM "
                                              r"head's 900 rows .*llm_config\.vocab_size 900"):
        load_checkpoint(path)


def test_norm_stats_without_action(broken):
    path = broken()
    _edit_config(path, lambda c: c["norm_stats"].update(other={"proprio": {}}))
    with pytest.raises(CheckpointError, match=r"norm_stats\['other'\] has no 'action'"):
        load_checkpoint(path)


@pytest.mark.parametrize("weight_map, shown", [
    (["a", "b"], "a list"),
    ({"model.transformer.ln_f.weight": None}, "'model.transformer.ln_f.weight': None"),
    ({"model.transformer.ln_f.weight": "../elsewhere.safetensors"},
     "'model.transformer.ln_f.weight': '../elsewhere.safetensors'"),
])
def test_malformed_index_is_named(broken, weight_map, shown):
    path = broken("D", 3)
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=re.escape(f"{INDEX}: not a valid index (weight_map has {shown})")):
        load_checkpoint(path)


# --------------------------------------------------------------------------- never-run ViT blocks


def _vit_blocks(names) -> set[int]:
    return {int(n.split("resblocks.")[1].split(".")[0]) for n in names if "resblocks." in n}


def test_published_checkpoints_hold_only_the_vit_blocks_that_run(made, tmp_path):
    """MolmoAct's code builds and saves ViT blocks only up to the deepest layer the connector reads, while
    config.json keeps the full depth: such a checkpoint loads, and one that also holds the deeper blocks
    (older writers) loads to the same model."""
    from edgeact.export.generate import forward_logits

    cfg = synthetic_config("D", "tiny")
    n = cfg.vit_config.num_hidden_layers
    deepest = max(lay % n for lay in cfg.adapter_config.vit_layers)
    assert deepest + 1 < n      # the tiny -D config skips its last block, as -7B-D skips two
    path = made[("D", 1)]
    assert json.loads((path / "config.json").read_text())["vit_config"]["num_hidden_layers"] == n
    with safe_open(path / "model.safetensors", "pt") as f:
        assert _vit_blocks(f.keys()) == set(range(deepest + 1))

    full = tmp_path / "with-unused-blocks"
    import shutil
    shutil.copytree(path, full)
    block = {k: v for k, v in load_file(path / "model.safetensors").items() if f"resblocks.{deepest}." in k}
    _rewrite(full / "model.safetensors",
             lambda t: t.update({k.replace(f"resblocks.{deepest}.", f"resblocks.{n - 1}."): v for k, v in block.items()}))
    model, ckpt = load_model(path)
    model_full, ckpt_full = load_model(full)
    assert list(ckpt_full.tensors) == list(ckpt.tensors)      # the unused block is not loaded
    inputs = _prompt_and_images(ckpt)
    assert torch.equal(forward_logits(model_full, *inputs), forward_logits(model, *inputs))

    # A deeper block of the wrong shape is still a broken checkpoint.
    _rewrite(full / "model.safetensors", lambda t: t.update(
        {f"model.vision_backbone.image_vit.transformer.resblocks.{n - 1}.attention.wq.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"resblocks\.{n - 1}\.attention\.wq\.bias has shape \(3,\)"):
        load_checkpoint(full)


# --------------------------------------------------------------------------- config.json that is not one


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", r"config\.json: not valid JSON \('utf-8' codec can't decode.*re-download or re-export"),
    (b"[1, 2]", r"config\.json: the top level is a JSON list, not an object; a MolmoAct config\.json is an object"),
    (b"", r"config\.json: not valid JSON \(Expecting value"),
])
def test_a_config_json_that_is_not_an_object_is_named(broken, content, message):
    path = broken("D", 1)
    (path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(image_patch_id="abc"), r"image_patch_id is 'abc'; it must be a whole number \(the token id"),
    (lambda c: c.update(image_patch_id=None), r"image_patch_id is None; it must be a whole number"),
    (lambda c: c.update(n_action_bins="x"), r"n_action_bins is 'x'; it must be a whole number \(MolmoAct: 256\)"),
    (lambda c: c.update(architectures=5), r"architectures is 5; it must be a list of class names"),
    (lambda c: c["llm_config"].update(hidden_size="big"), r"llm_config\.hidden_size is 'big'; it must be a whole "
                                                          r"number"),
    (lambda c: c["vit_config"].update(num_hidden_layers=2.5), r"vit_config\.num_hidden_layers is 2\.5; it must be a "
                                                              r"whole number"),
    (lambda c: c["vit_config"].update(image_default_input_size="378"), r"vit_config\.image_default_input_size is "
                                                                       r"'378'; it must be a list of whole numbers"),
    (lambda c: c["vit_config"].update(image_default_input_size=[378]),
     r"vit_config\.image_default_input_size is \[378\]; give \[height, width\]"),
    (lambda c: c["llm_config"].update(use_qk_norm="no"), r"llm_config\.use_qk_norm is 'no'; it must be true or false"),
    (lambda c: c.update(llm_config=[1]), r"sub-config 'llm_config' is a JSON list, not an object"),
])
def test_config_values_of_the_wrong_type_name_the_key_and_the_type(broken, edit, message):
    path = broken("D", 1)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load_checkpoint(path)


@pytest.mark.parametrize("section, key", [("llm_config", "hidden_size"), ("vit_config", "hidden_size"),
                                          ("llm_config", "vocab_size"), ("vit_config", "float32_attention"),
                                          ("adapter_config", "text_hidden_size")])
def test_a_missing_config_key_is_named_not_filled_with_7b_defaults(broken, section, key):
    """A default would be MolmoAct-7B-D's value: the error then blamed a value the file does not hold (e.g.
    'text_hidden_size 64 must equal llm_config.hidden_size 3584')."""
    path = broken("D", 1)
    _edit_config(path, lambda c: c[section].pop(key))
    with pytest.raises(CheckpointError, match=rf"config\.json: {section} is missing '{key}'; a MolmoAct config\.json "
                                              r"gives every key"):
        load_checkpoint(path)


def test_optional_config_keys_may_be_left_out(broken):
    path = broken("O", 1)
    _edit_config(path, lambda c: [c["llm_config"].pop(k) for k in ("rope_scaling", "qk_norm_type",
                                                                   "tie_word_embeddings")])
    assert load_checkpoint(path).config == load_checkpoint(broken("O", 3)).config


def test_the_committed_reference_checkpoints_config_loads():
    from edgeact.runtime.arm_config import ArmConfig

    root = Path(__file__).resolve().parents[2] / "drivers" / "sim" / "reference_arm" / "checkpoint"
    assert ArmConfig.load(root / "config.json").variant == "D"
