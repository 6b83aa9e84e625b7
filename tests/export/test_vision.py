"""The vision side: which ViT layers feed the connector, padding embeddings, and 2x2 attention pooling."""
import torch

from tests.export.conftest import tiny_images, tiny_model


def test_features_concatenate_the_configured_vit_layers_in_order(variant):
    model = tiny_model(variant)
    vision = model.vision
    img = tiny_images(model.cfg)
    outputs = {}
    hooks = [block.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n, block in enumerate(vision.image_vit.transformer.resblocks)]
    with torch.no_grad():
        features = vision.patch_features(img.images, torch.ones_like(img.image_masks))
    for h in hooks:
        h.remove()
    prefix = 1 if variant == "O" else 0  # CLIP's CLS position is dropped
    layers = [lay + 4 for lay in model.cfg.adapter_config.vit_layers]
    expected = torch.cat([outputs[lay][:, prefix:] for lay in layers], dim=-1)
    assert features.shape == (2, 16, 64)
    assert torch.equal(features, expected)


def test_vit_blocks_past_the_deepest_needed_layer_are_not_built():
    model = tiny_model("D")  # vit_layers [-2, -4] of 4 blocks: block 3 is unused, as MolmoAct's code leaves it out
    assert model.cfg.vit_config.num_hidden_layers == 4
    assert len(model.vision.image_vit.transformer.resblocks) == 3
    img = tiny_images(model.cfg)
    with torch.no_grad():
        before = model.image_features(img.images, img.image_masks, img.pooled_patches_idx)
        model.vision.image_vit.transformer.resblocks[2].feed_forward.w2.weight.add_(1.0)
        changed = model.image_features(img.images, img.image_masks, img.pooled_patches_idx)
    assert not torch.allclose(before, changed)     # the deepest block read still runs


def test_pad_embeddings_mark_full_and_partial_padding():
    model = tiny_model("O")
    vision = model.vision
    img = tiny_images(model.cfg)
    masks = torch.ones(2, 16)
    masks[0, 0], masks[1, 5] = 0.0, 0.3
    with torch.no_grad():
        clean = vision.patch_features(img.images, torch.ones(2, 16))
        padded = vision.patch_features(img.images, masks)
    delta = padded - clean
    assert torch.allclose(delta[0, 0], vision.pad_embed[0], atol=1e-6)
    assert torch.allclose(delta[1, 5], vision.pad_embed[1], atol=1e-6)
    untouched = torch.ones(2, 16, dtype=torch.bool)
    untouched[0, 0] = untouched[1, 5] = False
    assert torch.equal(delta[untouched], torch.zeros_like(delta[untouched]))


def _masked_pooling_model(variant):
    """Molmo2-style: adapter_config.pooling_attention_mask = True."""
    model = tiny_model(variant)
    model.vision.adapter_cfg.pooling_attention_mask = True
    return model


def test_masked_pooling_leaves_padding_out_of_query_and_keys(variant):
    vision = _masked_pooling_model(variant).vision
    features = torch.randn(10, 64)
    with torch.no_grad():
        padded = vision.pool(features, torch.tensor([[2, -1, 7, -1], [4, 5, 6, 9]]))
        two_keys = vision.pool(features, torch.tensor([[2, 7]]))
        features[[0, 1, 3, 8]] += 5.0  # patches no index points at
        again = vision.pool(features, torch.tensor([[2, -1, 7, -1], [4, 5, 6, 9]]))
    assert torch.allclose(padded[0], two_keys[0], atol=1e-6)
    assert torch.equal(padded, again)


def test_molmoact_pooling_keeps_zeroed_padding_slots_as_keys(variant):
    """Published MolmoAct: padding slots are zero vectors that stay in the mean and the keys."""
    vision = tiny_model(variant).vision
    features = torch.randn(10, 64)
    with torch.no_grad():
        padded = vision.pool(features, torch.tensor([[2, -1, 7, -1]]))
        explicit_zeros = vision.pool(torch.cat([features, torch.zeros(1, 64)]), torch.tensor([[2, 10, 7, 10]]))
        two_keys = vision.pool(features, torch.tensor([[2, 7]]))
        features[[0, 1, 3, 8]] += 5.0  # patches no index points at
        again = vision.pool(features, torch.tensor([[2, -1, 7, -1]]))
    assert torch.allclose(padded, explicit_zeros, atol=1e-6)
    assert not torch.allclose(padded, two_keys, atol=1e-4)
    assert torch.equal(padded, again)


def test_pooled_token_with_only_padding_is_finite(variant):
    for model in (tiny_model(variant), _masked_pooling_model(variant)):
        with torch.no_grad():
            out = model.vision.pool(torch.randn(10, 64), torch.tensor([[-1, -1, -1, -1], [1, 2, 3, 4]]))
        assert out.shape == (2, 32)
        assert torch.isfinite(out).all()


def test_pooling_query_is_the_mean_of_the_pooled_slots():
    for masked in (False, True):
        vision = (_masked_pooling_model if masked else tiny_model)("D").vision
        features = torch.randn(6, 64)
        seen = {}
        hook = vision.image_pooling_2d.wq.register_forward_hook(lambda m, i, o: seen.__setitem__("q", i[0]))
        with torch.no_grad():
            vision.pool(features, torch.tensor([[0, 1, 2, 3], [4, -1, 5, -1]]))
        hook.remove()
        assert torch.allclose(seen["q"][0, 0], features[:4].mean(0), atol=1e-6)
        # MolmoAct divides by all 4 slots (zeros included); Molmo2's masked form by the 2 valid ones.
        expected = features[4:6].sum(0) / (2 if masked else 4)
        assert torch.allclose(seen["q"][1, 0], expected, atol=1e-6)


def _layer_norm(x, norm):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def test_vit_matches_the_blocks_written_out_by_hand(variant):
    vit = tiny_model(variant).vision.image_vit
    cfg = vit.cfg
    act = {"gelu_pytorch_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
           "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[cfg.hidden_act]
    patches = torch.randn(2, 16, 588)
    with torch.no_grad():
        x = patches @ vit.patch_embedding.weight.T
        if cfg.patch_bias:
            x = x + vit.patch_embedding.bias
        if cfg.use_cls_token:  # CLIP: CLS first, position 0 is its own
            x = torch.cat([vit.class_embedding.expand(2, 1, -1), x], 1)
        x = x + vit.positional_embedding
        if cfg.pre_layernorm:
            x = _layer_norm(x, vit.pre_ln)
        for block in vit.transformer.resblocks[:2]:
            a, h = block.attention, _layer_norm(x, block.attention_norm)
            q, k, v = (lin(h).view(2, -1, 2, 16).transpose(1, 2) for lin in (a.wq, a.wk, a.wv))
            att = ((q @ k.transpose(-1, -2)) / 4.0).softmax(-1) @ v
            x = x + a.wo(att.transpose(1, 2).reshape(2, -1, 32))
            f = block.feed_forward
            x = x + f.w2(act(f.w1(_layer_norm(x, block.ffn_norm))))
        out = vit(patches, 2)
    assert len(out) == 2
    assert torch.allclose(out[1], x, atol=1e-5)


def test_projector_is_swiglu_with_w1_gated():
    projector = tiny_model("D").vision.image_projector
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = (torch.nn.functional.silu(x @ projector.w1.weight.T) * (x @ projector.w3.weight.T)) @ projector.w2.weight.T
        assert torch.allclose(projector(x), expected, atol=1e-6)
