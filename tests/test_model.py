"""DeformableDETR: output shapes, padding masks, frozen parts, parameter groups, backbone weights."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from stepwise.config import load_config
from stepwise.models import (Backbone, DetectorOutput, MSDeformAttn, PositionEmbeddingSine, build_detector,
                             param_groups, trainable_only)
from stepwise.models import backbone as backbone_module

NUM_CLASSES, QUERIES = 7, 20


def _tiny(*overrides):
    # the plain model unless a test asks for box refinement / two-stage (later overrides win)
    cfg = load_config(["model=tiny", f"model.num_queries={QUERIES}", "model.with_box_refine=false",
                       "model.two_stage=false", *overrides])
    torch.manual_seed(0)
    return build_detector(cfg.model, cfg.head, NUM_CLASSES).model


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.mark.parametrize("refine,two_stage", [(False, False), (True, False), (True, True), (False, True)])
def test_output_shapes(refine, two_stage):
    model = _tiny(f"model.with_box_refine={refine}", f"model.two_stage={two_stage}").train()
    images, masks = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True
    out = model(images, masks)
    assert isinstance(out, DetectorOutput)
    layers, d = model.transformer.decoder.num_layers, model.transformer.d_model
    assert len(out.logits) == len(out.boxes) == len(out.query_features) == layers
    for logits, boxes, feats in zip(out.logits, out.boxes, out.query_features):
        assert logits.shape == (2, QUERIES, NUM_CLASSES) and boxes.shape == (2, QUERIES, 4)
        assert feats.shape == (2, QUERIES, d)
        assert ((boxes >= 0) & (boxes <= 1)).all()
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2)]  # strides 8, 16, 32 and the extra stride-2 level
    assert [tuple(f.shape) for f in out.proj_features] == [(2, d, *s) for s in sizes]
    assert [tuple(m.shape) for m in out.proj_masks] == [(2, *s) for s in sizes]
    assert out.proj_masks[0][1, :, 8:].all() and not out.proj_masks[0][1, :, :8].any()
    if two_stage:
        tokens = sum(h * w for h, w in sizes)
        assert out.enc_logits.shape == (2, tokens, NUM_CLASSES) and out.enc_boxes.shape == (2, tokens, 4)
    else:
        assert out.enc_logits is None and out.enc_boxes is None
    sum(x.sum() for x in out.logits + out.boxes).backward()  # the graph reaches the trainable parameters
    assert model.input_proj[0][0].weight.grad is not None


def test_heads_shared_or_cloned_as_the_original():
    shared = _tiny()
    assert shared.class_embed[0] is shared.class_embed[1] and shared.bbox_embed[0] is shared.bbox_embed[1]
    refine = _tiny("model.with_box_refine=true")
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert torch.equal(refine.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert torch.equal(refine.bbox_embed[1].layers[-1].bias, torch.zeros(4))
    two = _tiny("model.with_box_refine=true", "model.two_stage=true")
    assert len(two.class_embed) == two.transformer.decoder.num_layers + 1
    assert not hasattr(two, "query_embed")


def test_position_encoding_ignores_padding():
    pe = PositionEmbeddingSine(16)
    alone = pe(torch.zeros(1, 5, 7, dtype=torch.bool))
    mask = torch.ones(1, 9, 12, dtype=torch.bool)
    mask[:, :5, :7] = False
    padded = pe(mask)
    torch.testing.assert_close(padded[..., :5, :7], alone)


def test_padded_content_does_not_reach_the_transformer_outputs(tiny):
    """Values at padded positions are zeroed in every deformable attention: changing them changes nothing."""
    tiny.eval()
    d, shapes = tiny.transformer.d_model, [(8, 8), (4, 4), (2, 2), (1, 1)]
    masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in shapes]
    for m in masks[:3]:
        m[:, :, m.shape[-1] // 2:] = True
    srcs = [torch.randn(1, d, h, w) for h, w in shapes]
    pos = [tiny.position_embedding(m) for m in masks]
    changed = [s.masked_fill(m[:, None], 100.0) for s, m in zip(srcs, masks)]
    with torch.no_grad():
        a = tiny.transformer(srcs, masks, pos, tiny.query_embed.weight)[0]
        b = tiny.transformer(changed, masks, pos, tiny.query_embed.weight)[0]
    torch.testing.assert_close(a, b)


def test_deformable_attention_runs_in_float32_under_autocast():
    attn = MSDeformAttn(d_model=32, n_levels=1, n_heads=4, n_points=2)
    shapes = torch.tensor([[4, 4]])
    value, query = torch.randn(2, 16, 32), torch.randn(2, 3, 32)
    ref = torch.rand(2, 3, 1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, value, shapes, torch.tensor([0]))
    assert out.shape == (2, 3, 32) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("low_precision, autocast, expected", [
    (False, True, torch.float32),    # the default: the op runs in float32 under autocast
    (True, True, torch.bfloat16),    # model.msda_low_precision: the op gets the autocast dtype
    (True, False, torch.float32),    # no autocast: nothing changes
])
def test_msda_low_precision_switch_reaches_the_op(monkeypatch, low_precision, autocast, expected):
    from stepwise.models import deformable_transformer
    from stepwise_ops import ms_deform_attn_reference

    seen = []

    def recording_op(value, spatial_shapes, level_start_index, locations, weights):
        seen.append((value.dtype, locations.dtype, weights.dtype, torch.is_autocast_enabled("cpu")))
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)

    monkeypatch.setattr(deformable_transformer, "ms_deform_attn", recording_op)
    model = _tiny(f"model.msda_low_precision={low_precision}").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(torch.randn(1, 3, 64, 64))
    layers = model.transformer.encoder.num_layers + model.transformer.decoder.num_layers
    assert len(seen) == layers == 4
    # float32 runs with autocast off inside the op; the bf16 path keeps autocast as it was
    assert set(seen) == {(expected, expected, expected, autocast and expected == torch.bfloat16)}
    assert all(torch.isfinite(x.float()).all() for x in out.logits + out.boxes)


def test_frozen_batchnorm_stem_and_layer1():
    # the paper's setting (pretrained backbones): frozen BN, stem and layer1 frozen
    body = _tiny("model.backbone_frozen_prefixes=null", "model.backbone_freeze_bn=true").backbone.body
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    for name, p in body.named_parameters():
        frozen = name.split(".")[0] in ("conv1", "bn1", "layer1")
        assert p.requires_grad != frozen, name
    custom = Backbone("resnet10t", frozen_prefixes=["layer1", "layer2"])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in custom.body.modules())
    assert all(not p.requires_grad for n, p in custom.body.named_parameters() if n.startswith("layer2."))
    assert all(p.requires_grad for n, p in custom.body.named_parameters() if n.startswith("conv1"))


def test_tiny_preset_trains_its_random_backbone_whole(tiny):
    body = tiny.backbone.body
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    assert all(p.requires_grad for p in body.parameters())


def test_param_groups_cover_every_trainable_parameter_once(tiny):
    groups = param_groups(tiny, {"lr": 2e-4, "lr_backbone": 2e-5, "weight_decay": 1e-4})
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in tiny.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == 2e-5 and by_name["other"]["lr"] == 2e-4
    assert by_name["linear_proj"]["lr"] == pytest.approx(2e-5)
    offsets = tiny.transformer.encoder.layers[0].self_attn.sampling_offsets.weight
    assert any(p is offsets for p in by_name["linear_proj"]["params"])
    torch.optim.AdamW(groups)
    with pytest.raises(KeyError, match="lr_backbone"):
        param_groups(tiny, {"lr": 1e-4, "weight_decay": 0.0})


def test_trainable_only():
    model = _tiny("model.with_box_refine=true")
    names = trainable_only(model, ["input_proj", "class_embed"])
    assert names and all(n.startswith(("input_proj.", "class_embed.")) for n in names)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(("input_proj.", "class_embed.")), name
    assert {g["name"] for g in param_groups(model, {"lr": 1, "lr_backbone": 1, "weight_decay": 0})} == {"other"}
    with pytest.raises(ValueError, match="nonexistent"):
        trainable_only(model, ["nonexistent"])


def test_hub_weights_without_network_fall_back_with_a_warning(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(backbone_module.timm, "create_model", offline)
    with pytest.warns(RuntimeWarning, match="RANDOM weights"):
        bb = Backbone("resnet10t", weights="hub")
    feats, masks = bb(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert [f.shape[-1] for f in feats] == [8, 4, 2] and len(masks) == 3


def test_backbone_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": full.state_dict()}, path)  # classifier keys included: they are ignored
    bb = Backbone("resnet10t", weights=str(path))
    torch.testing.assert_close(bb.body.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
    torch.testing.assert_close(bb.body.layer2[0].bn1.running_var, full.layer2[0].bn1.running_var)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Backbone("resnet10t", weights=str(tmp_path / "missing.pth"))
    torch.save({"conv1.0.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth"):
        Backbone("resnet10t", weights=str(tmp_path / "partial.pth"))


def test_presets_compose():
    r50 = load_config(["model=deformable_detr_r50"]).model
    got = (r50.backbone_name, r50.d_model, r50.enc_layers, r50.dec_layers, r50.num_queries)
    assert got == ("resnet50", 256, 6, 6, 300)
    assert r50.with_box_refine and r50.two_stage and r50.dim_feedforward == 1024 and r50.num_feature_levels == 4
    tiny = load_config(["model=tiny"]).model
    assert tiny.d_model == 128 and tiny.enc_layers == tiny.dec_layers == 2 and tiny.backbone_weights is None
