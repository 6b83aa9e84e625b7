"""The reference model's checkpoint contract, embedding rules and precisions."""
import pytest
import torch

from edgeact.export.model import MolmoActModel
from edgeact.export.model_inputs import ModelInputError
from edgeact.export.tensor_names import expected_tensor_shapes
from tests.export.conftest import EXTRA_TOKEN, IM_PATCH, tiny_config, tiny_images, tiny_model, tiny_prompt


def test_state_dict_matches_the_checkpoint_table_exactly(variant):
    cfg = tiny_config(variant)
    shapes = {name: tuple(t.shape) for name, t in MolmoActModel(cfg).state_dict().items()}
    assert shapes == expected_tensor_shapes(cfg)


def test_checkpoint_tensors_load_strictly_and_are_used(variant):
    cfg = tiny_config(variant)
    gen = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(shape, generator=gen) * 0.1 for name, shape in expected_tensor_shapes(cfg).items()}
    model = MolmoActModel(cfg).eval()
    model.load_state_dict(tensors, strict=True)
    for name, t in model.state_dict().items():
        assert torch.equal(t, tensors[name]), name


def test_tied_embeddings_drop_lm_head_and_reuse_the_base_table():
    cfg = tiny_config("D")
    cfg.llm_config.tie_word_embeddings = True
    model = MolmoActModel(cfg)
    assert set(model.state_dict()) == set(expected_tensor_shapes(cfg))
    hidden = torch.randn(3, 64)
    assert torch.allclose(model.logits(hidden), hidden @ model.decoder.wte.embedding.T)


def test_ids_past_vocab_size_read_the_new_embedding_table():
    model = tiny_model("D")
    wte = model.decoder.wte
    ids = torch.tensor([[0, 511, 512, EXTRA_TOKEN, 639]])
    expected = torch.stack([wte.embedding[0], wte.embedding[511], wte.new_embedding[0],
                            wte.new_embedding[EXTRA_TOKEN - 512], wte.new_embedding[127]])
    assert torch.equal(model.embed(ids)[0], expected)


def test_logits_cover_the_base_vocabulary_only(variant):
    model = tiny_model(variant)
    assert model(torch.tensor([[1, 2, EXTRA_TOKEN]])).shape == (1, 3, 512)


def test_image_features_are_added_at_im_patch_positions_in_order(variant):
    model = tiny_model(variant)
    img = tiny_images(model.cfg)
    ids = tiny_prompt(img.n_tokens)
    with torch.no_grad():
        mixed = model.embed_multimodal(ids, img.images, img.image_masks, img.pooled_patches_idx)[0]
        text = model.embed(ids[None])[0]
        features = model.image_features(img.images, img.image_masks, img.pooled_patches_idx)
    is_patch = ids == IM_PATCH
    assert torch.equal(mixed[~is_patch], text[~is_patch])
    assert torch.allclose(mixed[is_patch] - text[is_patch], features, atol=1e-6)
    assert features.abs().sum() > 0


def test_zero_projector_leaves_the_text_embeddings(variant):
    model = tiny_model(variant)
    img = tiny_images(model.cfg)
    ids = tiny_prompt(img.n_tokens)
    with torch.no_grad():
        model.vision.image_projector.w2.weight.zero_()
        mixed = model.embed_multimodal(ids, img.images, img.image_masks, img.pooled_patches_idx)
        assert torch.equal(mixed, model.embed(ids[None]))


def test_one_image_token_changes_only_logits_from_its_position_on(variant):
    model = tiny_model(variant)
    img = tiny_images(model.cfg)
    ids = tiny_prompt(img.n_tokens)
    target = 5  # the 6th pooled token
    position = int((ids == IM_PATCH).nonzero()[target])

    def nudge(module, inputs, output):
        output = output.clone()
        output[target] += 0.5
        return output

    with torch.no_grad():
        before = model(ids, img.images, img.image_masks, img.pooled_patches_idx)[0]
        handle = model.vision.register_forward_hook(nudge)
        after = model(ids, img.images, img.image_masks, img.pooled_patches_idx)[0]
        handle.remove()
    assert torch.equal(before[:position], after[:position])
    assert (before[position:] - after[position:]).abs().amax(-1).min() > 1e-4


def test_all_padding_pooled_tokens_are_dropped_before_matching_im_patch():
    model = tiny_model("D")
    img = tiny_images(model.cfg)
    idx = torch.cat([img.pooled_patches_idx, torch.full((1, 4), -1)])
    ids = tiny_prompt(img.n_tokens)
    with torch.no_grad():
        padded = model.embed_multimodal(ids, img.images, img.image_masks, idx)
        plain = model.embed_multimodal(ids, img.images, img.image_masks, img.pooled_patches_idx)
    assert torch.allclose(padded, plain, atol=1e-6)


def test_image_token_count_mismatch_names_both_counts():
    model = tiny_model("D")
    img = tiny_images(model.cfg)
    with pytest.raises(ModelInputError, match=r"7 <im_patch> tokens .* 8 pooled features"):
        model.embed_multimodal(tiny_prompt(7), img.images, img.image_masks, img.pooled_patches_idx)
    with pytest.raises(ModelInputError, match="0 pooled features"):
        model.embed_multimodal(tiny_prompt(2))


@pytest.mark.parametrize("bad", ["id", "shape", "masks"])
def test_bad_inputs_raise_errors_that_say_what_to_pass(bad):
    model = tiny_model("O")
    img = tiny_images(model.cfg)
    ids, images, masks = tiny_prompt(img.n_tokens), img.images, img.image_masks
    if bad == "id":
        ids[3] = 640
    elif bad == "shape":
        images = images[:, :15]
    else:
        masks = None
    with pytest.raises(ModelInputError, match={"id": "embedding table", "shape": "expected", "masks": "image_masks"}[bad]):
        model.embed_multimodal(ids, images, masks, img.pooled_patches_idx)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 0.05), (torch.bfloat16, 0.25)])
def test_half_precisions_run_and_stay_close_to_float32(variant, dtype, tol):
    model = tiny_model(variant)
    img = tiny_images(model.cfg)
    ids = tiny_prompt(img.n_tokens)
    with torch.no_grad():
        ref = model(ids, img.images, img.image_masks, img.pooled_patches_idx).float()
        model.to(dtype)
        low = model(ids, img.images, img.image_masks, img.pooled_patches_idx)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    scale = ref.abs().amax()
    assert (low.float() - ref).abs().amax() < tol * scale
