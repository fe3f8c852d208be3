"""Deformable transformer (Zhu et al. 2020): multi-scale deformable attention, encoder, decoder, two-stage.

Module and parameter names follow the original fundamentalvision/Deformable-DETR code so that its
checkpoints (and Hugging Face's, through ``interop``) load by renaming only.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from stepwise_ops import ms_deform_attn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] as in Deformable DETR."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _activation(name: str):
    acts = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(acts)}")
    return acts[name]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples n_points per head and level around its reference.

    Args:
        d_model, n_levels, n_heads, n_points: as in the paper.
        low_precision: under autocast (value in float16/bfloat16), run the op in that dtype (the compiled
            op's half-precision CUDA kernels; sampling locations and weights are rounded to it too).
            False (default): the op always runs in at least float32, autocast off. See ops/README.md
            ("Half precision in the detector") for the evidence needed before turning it on.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 low_precision: bool = False):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.low_precision = bool(low_precision)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, one per head, growing per point."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C) queries (position embedding already added).
            reference_points: (N, Lq, L, 2) points in [0, 1] (x, y), or (N, Lq, L, 4) boxes (cx, cy, w, h).
            input_flatten: (N, S, C) flattened multi-level values, S = sum_l H_l * W_l.
            spatial_shapes: (L, 2) long (H_l, W_l); level_start_index: (L,) long.
            input_padding_mask: (N, S) bool, True on padding.
        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape}")
        out = self._attend(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)

    def _attend(self, value, spatial_shapes, level_start_index, locations, weights) -> torch.Tensor:
        """The op on value (N, S, M, D), locations (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P) ->
        (N, Lq, M * D) in value's dtype. With ``low_precision`` and a float16/bfloat16 value (autocast),
        all three inputs go to the op in value's dtype; otherwise in float32 (float64 stays float64)
        with autocast off."""
        dtype = value.dtype
        if self.low_precision and dtype in (torch.float16, torch.bfloat16):
            return ms_deform_attn(value, spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))
        compute = torch.promote_types(dtype, torch.float32)
        with torch.autocast(device_type=value.device.type, enabled=False):
            out = ms_deform_attn(value.to(compute), spatial_shapes, level_start_index, locations.to(compute),
                                 weights.to(compute))
        return out.to(dtype)


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, post-norm. (N, S, C) -> (N, S, C)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
                 n_points=4, msda_low_precision=False):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, low_precision=msda_low_precision)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers over the flattened levels."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor,
                             device: torch.device) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid area: (N, S, L, 2) (x, y)."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(refs, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios, pos,
                padding_mask=None):
        """src, pos (N, S, C); valid_ratios (N, L, 2); padding_mask (N, S) -> memory (N, S, C)."""
        reference_points = self.get_reference_points(spatial_shapes_list, valid_ratios, src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention over queries, deformable cross-attention into the memory, FFN; post-norm."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
                 n_points=4, msda_low_precision=False):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, low_precision=msda_low_precision)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index,
                src_padding_mask=None):
        """tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2|4); src (N, S, C) -> (N, Q, C)."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, src, spatial_shapes, level_start_index,
                               src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output and reference points.

    With ``bbox_embed`` (a list of per-layer box MLPs, passed at call time: they belong to the detector),
    each layer refines the reference boxes (iterative bounding box refinement).
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios, query_pos,
                src_padding_mask=None, bbox_embed=None):
        """
        Args:
            tgt, query_pos: (N, Q, C); reference_points: (N, Q, 2) or (N, Q, 4) in [0, 1].
            src: (N, S, C) memory; valid_ratios: (N, L, 2); src_padding_mask: (N, S) bool.
        Returns:
            hs (num_layers, N, Q, C), references (num_layers, N, Q, 2|4): the reference each layer's
            output was refined to (the input reference of the next layer).
        """
        output = tgt
        intermediate, intermediate_refs = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            output = layer(output, query_pos, ref_input, src, spatial_shapes, level_start_index, src_padding_mask)
            if bbox_embed is not None:
                tmp = bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_ref = (tmp + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat([tmp[..., :2] + inverse_sigmoid(reference_points), tmp[..., 2:]], -1)
                    new_ref = new_ref.sigmoid()
                reference_points = new_ref.detach()
            intermediate.append(output)
            intermediate_refs.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_refs)


class DeformableTransformer(nn.Module):
    """Encoder over flattened multi-level features + decoder over object queries (optionally two-stage).

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
        num_feature_levels, dec_n_points, enc_n_points: as in the paper.
        two_stage: queries come from the top-k encoder proposals; two_stage_num_proposals = k.
        msda_low_precision: every deformable attention runs in the autocast dtype (see ``MSDeformAttn``).
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
                 dropout=0.1, activation="relu", num_feature_levels=4, dec_n_points=4, enc_n_points=4,
                 two_stage=False, two_stage_num_proposals=300, msda_low_precision=False):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.two_stage, self.two_stage_num_proposals = two_stage, two_stage_num_proposals
        enc_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                      num_feature_levels, nhead, enc_n_points, msda_low_precision)
        self.encoder = DeformableTransformerEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                      num_feature_levels, nhead, dec_n_points, msda_low_precision)
        self.decoder = DeformableTransformerDecoder(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """(N, K, 4) proposal logits -> (N, K, 4 * d_model / 2) sine embedding of the sigmoid boxes (float32)."""
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = proposals.float().sigmoid()[:, :, :, None] * scale / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory: torch.Tensor, padding_mask: torch.Tensor,
                                     spatial_shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One proposal per encoder pixel: memory (N, S, C), padding_mask (N, S) ->
        (projected memory (N, S, C), proposal logits (N, S, 4); inf where padded or too close to the border)."""
        n = memory.shape[0]
        proposals, cur = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes):
            mask = padding_mask[:, cur:cur + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask[:, :, 0, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
                torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            cur += h * w
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))
        output_memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), output_proposals

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(N, H, W) padding mask -> (N, 2) valid fraction (width, height)."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs, masks, pos_embeds, query_embed=None, refine_bbox_embed=None, enc_class_embed=None,
                enc_bbox_embed=None):
        """
        Args:
            srcs, pos_embeds: per level (N, C, H_l, W_l); masks: per level (N, H_l, W_l) bool.
            query_embed: (Q, 2C) learned queries (positional half, content half); unused in two-stage.
            refine_bbox_embed: the detector's per-decoder-layer box MLPs for iterative refinement, or None.
            enc_class_embed, enc_bbox_embed: (two-stage) the heads scoring and regressing the encoder
                proposals; the top-k are ranked by the encoder logits' channel 0 (the original's semantics:
                its criterion trains encoder proposals with every target labelled class 0).
        Returns:
            hs (num_dec_layers, N, Q, C), init_reference (N, Q, 2|4), inter_references
            (num_dec_layers, N, Q, 2|4), enc_logits (N, S, K) or None, enc_coord_logits (N, S, 4) or None.
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed is required unless two_stage")
        src_flatten, mask_flatten, lvl_pos_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            _, _, h, w = src.shape
            shapes.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_flatten = torch.cat(lvl_pos_flatten, 1).to(src_flatten.dtype)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flatten, spatial_shapes, shapes, level_start_index, valid_ratios,
                              lvl_pos_flatten, mask_flatten)

        n, _, c = memory.shape
        enc_logits = enc_coord_logits = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, shapes)
            if enc_class_embed is None or enc_bbox_embed is None:
                raise ValueError("DeformableTransformer: two_stage needs enc_class_embed and enc_bbox_embed")
            enc_logits = enc_class_embed(output_memory)
            enc_coord_logits = enc_bbox_embed(output_memory) + output_proposals
            topk = min(self.two_stage_num_proposals, enc_logits.shape[1])
            topk_idx = torch.topk(enc_logits[..., 0], topk, dim=1)[1]
            topk_coords = torch.gather(enc_coord_logits, 1, topk_idx.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords.sigmoid()
            init_reference = reference_points
            pos_trans_out = self.pos_trans_norm(self.pos_trans(
                self.get_proposal_pos_embed(topk_coords).to(memory.dtype)))
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
            tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
            init_reference = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, mask_flatten, bbox_embed=refine_bbox_embed)
        return hs, init_reference, inter_references, enc_logits, enc_coord_logits
