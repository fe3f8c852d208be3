"""HF DeformableDetrForObjectDetection / original-checkpoint weights load into DeformableDETR and match."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf

from stepwise.config import load_config
from stepwise.models import build_detector, inverse_sigmoid, load_hf_deformable_detr, load_original_deformable_detr

transformers = pytest.importorskip("transformers")

D, LAYERS, QUERIES, CLASSES = 64, 2, 12, 5
CONFIGS = {
    "default": dict(with_box_refine=False, two_stage=False),
    "box_refine": dict(with_box_refine=True, two_stage=False),
    "two_stage": dict(with_box_refine=True, two_stage=True),
}


def _hf_model(with_box_refine: bool, two_stage: bool):
    cfg = transformers.DeformableDetrConfig(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, d_model=D,
        encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_ffn_dim=96, decoder_ffn_dim=96,
        encoder_attention_heads=4, decoder_attention_heads=4, num_queries=QUERIES,
        two_stage_num_proposals=QUERIES, num_labels=CLASSES, num_feature_levels=4,
        with_box_refine=with_box_refine, two_stage=two_stage)
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(cfg)
    with torch.no_grad():  # random weights everywhere (HF zero-inits some heads), BN statistics too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model.eval()


def _our_model(with_box_refine: bool, two_stage: bool, freeze_bn: bool = True):
    cfg_model = OmegaConf.create(dict(
        backbone_name="resnet18", backbone_weights=None, backbone_frozen_prefixes=None, d_model=D, nheads=4,
        backbone_freeze_bn=freeze_bn,
        enc_layers=LAYERS, dec_layers=LAYERS, dim_feedforward=96, dropout=0.1, activation="relu",
        num_feature_levels=4, enc_n_points=4, dec_n_points=4, num_queries=QUERIES,
        with_box_refine=with_box_refine, two_stage=two_stage))
    return build_detector(cfg_model, load_config(["head=sigmoid"]).head, CLASSES).model


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, 64:, :] = True   # second image is 64 x 88 inside the padded batch
    masks[1, :, 88:] = True
    return images, masks


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_weights_give_the_same_outputs(name):
    kw = CONFIGS[name]
    hf, ours = _hf_model(**kw), _our_model(**kw)
    load_hf_deformable_detr(ours, hf)
    ours.eval()
    images, masks = _inputs()
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~masks).long())
        out = ours(images, masks)
    assert len(out.logits) == LAYERS
    # HF stacks per-layer results only inside its loss; recompute them from its intermediate states.
    hs, init_ref, inter = ref.intermediate_hidden_states, ref.init_reference_points, ref.intermediate_reference_points
    for lvl in range(LAYERS):
        reference = inverse_sigmoid(init_ref if lvl == 0 else inter[:, lvl - 1])
        logits = hf.class_embed[lvl](hs[:, lvl])
        delta = hf.bbox_embed[lvl](hs[:, lvl])
        if reference.shape[-1] == 4:
            boxes = (delta + reference).sigmoid()
        else:
            boxes = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1).sigmoid()
        torch.testing.assert_close(out.logits[lvl], logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.boxes[lvl], boxes, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.query_features[lvl], hs[:, lvl], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logits[-1], ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.boxes[-1], ref.pred_boxes, atol=1e-4, rtol=0)
    if kw["two_stage"]:
        torch.testing.assert_close(out.enc_logits, ref.enc_outputs_class, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.enc_boxes, ref.enc_outputs_coord_logits.sigmoid(), atol=1e-4, rtol=0)
    else:
        assert out.enc_logits is None and out.enc_boxes is None


def test_hf_weights_load_into_live_batchnorm():
    """A model with trainable BatchNorm (the tiny preset's) takes frozen-BN weights and, in eval mode,
    gives the same outputs."""
    hf = _hf_model(with_box_refine=False, two_stage=False)
    frozen, live = _our_model(False, False), _our_model(False, False, freeze_bn=False)
    load_hf_deformable_detr(frozen, hf)
    load_hf_deformable_detr(live, hf)
    images, masks = _inputs()
    with torch.no_grad():
        a, b = frozen.eval()(images, masks), live.eval()(images, masks)
    torch.testing.assert_close(a.logits[-1], b.logits[-1], atol=1e-5, rtol=0)


def test_hf_architecture_mismatch_names_the_keys():
    hf, ours = _hf_model(with_box_refine=False, two_stage=False), _our_model(with_box_refine=True, two_stage=True)
    with pytest.raises(ValueError, match="query_position_embeddings|enc_output"):
        load_hf_deformable_detr(ours, hf.state_dict())


def _as_original_checkpoint(model) -> dict:
    """Our model's weights in the fundamentalvision/Deformable-DETR layout (torchvision backbone names)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.body."):
            key = "backbone.0.body." + key.removeprefix("backbone.body.")
        elif key.startswith("class_embed."):
            key = key.replace(".linear.", ".")
        state[key] = value.clone()
        if key.startswith(("class_embed.", "bbox_embed.")):
            state["transformer.decoder." + key] = value.clone()
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    return {"model": state, "epoch": 49}


def test_original_checkpoint_round_trip():
    torch.manual_seed(3)
    src = _our_model(with_box_refine=True, two_stage=True).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    dst = _our_model(with_box_refine=True, two_stage=True).eval()
    load_original_deformable_detr(dst, _as_original_checkpoint(src))
    images, masks = _inputs()
    with torch.no_grad():
        a, b = src(images, masks), dst(images, masks)
    torch.testing.assert_close(a.logits[-1], b.logits[-1], atol=0, rtol=0)
    torch.testing.assert_close(a.boxes[-1], b.boxes[-1], atol=0, rtol=0)


def test_original_checkpoint_unknown_key_is_named():
    model = _our_model(with_box_refine=False, two_stage=False)
    ckpt = _as_original_checkpoint(model)
    ckpt["model"]["mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery.weight"):
        load_original_deformable_detr(model, ckpt)


def test_hf_resnet_names_map_onto_timm_resnet():
    """HF's own ResNet backbone (use_timm_backbone=False) renames onto timm's resnet18, key for key."""
    from stepwise.models.interop import _hf_resnet_to_timm

    cfg = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                    layer_type="basic")
    hf_keys = set(transformers.ResNetModel(cfg).state_dict())
    timm_keys = set(timm.create_model("resnet18", features_only=True).state_dict())
    mapped = {_hf_resnet_to_timm(k) for k in hf_keys if not k.endswith("num_batches_tracked")}
    assert mapped == {k for k in timm_keys if not k.endswith("num_batches_tracked")}
