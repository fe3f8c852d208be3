"""Training throughput and peak memory: stepwise's DeformableDETR vs Hugging Face's
DeformableDetrForObjectDetection on the same architecture, weights, batch and targets.

    python bench/train_throughput.py --model tiny --batch 4 --size 160 160 --iters 10 --device cpu
    python bench/train_throughput.py --model deformable_detr_r50 --batch 2 --size 800 1066 --device cuda \
        --dtype fp32,bf16 --iters 20 --json throughput.json

One training step = forward, loss (ours: SetCriterion with aux losses; HF: its own loss from ``labels``
with ``auxiliary_loss``), backward, gradient clipping, AdamW step. The HF model is built from the
preset (configs/model/<name>.yaml: timm backbone with random weights, d_model, layers, heads, points,
queries, levels, dropout, box refine, two-stage) and ours gets its weights through
``load_hf_deformable_detr``. The backbone is set up as HF's whatever the preset says: frozen
BatchNorm, stem and layer1 frozen (as Deformable DETR; the bench freezes them in HF too, which
transformers 5 no longer does for timm backbones). The script first checks that both models give the
same outputs in eval mode and train the same number of parameters. Differences that remain: HF's loss
has no two-stage encoder-proposal term. HF's deformable attention path on the device is detected at
run time and named in the table ("HF (PyTorch attn)": its grid_sample implementation, as on a machine
without the hub kernels; "HF (kernel attn)" when a custom kernel replaces it): one forward of its
MultiScaleDeformableAttention on the device, counting grid_sample calls.

Speed: all implementations train in one process, their steps interleaved (the order rotating), so a
busy machine slows each alike; images/s = batch / median step time. Peak memory: what an
implementation's first two steps add above its model weights (gradients, AdamW state, activations). On
CUDA torch.cuda.max_memory_allocated, measured in the timing process (one fresh process per dtype),
each implementation's two steps in turn before the timed steps, so they also warm up; on the CPU the
process's resident-set high-water mark (VmHWM, as bench/msda.py), each implementation in a fresh process. Ratios are ours / HF: speed > 1 is faster, memory < 1 is
smaller. Where the compiled deformable attention op exists, ours runs both with it and with the
pure-PyTorch reference op (issue 4: the training step with the compiled op vs the reference), and under
bf16/fp16 autocast also with ``model.msda_low_precision=true`` ("ours (low-prec. op)": the op's
half-precision kernels instead of float32; ops/README.md). --json PATH writes the rows for
bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from msda import PeakMemory  # bench/ is on sys.path when this file runs as a script

PRESETS = ("tiny", "deformable_detr_r50")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("ours", "ours-lowp", "ours-reference", "hf")
LABELS = {"ours": "ours (compiled op)", "ours-lowp": "ours (low-prec. op)", "ours-reference": "ours (reference op)",
          "hf": "HF transformers"}
CHECK_SIZE = (128, 128)  # image size of the equal-outputs check (eval mode, one image)
MEMORY_STEPS = 2  # the second step is the first with AdamW state and activations together


# ------------------------------------------------------------------------------------------ configs
def load_bench_config(model: str, box_refine: bool | None, two_stage: bool | None) -> dict:
    """The project config (model preset, head, loss, stage) with a random backbone, as a plain dict."""
    from stepwise.config import load_config

    overrides = [f"model={model}", "model.backbone_weights=null", "head=sigmoid"]
    if box_refine is not None:
        overrides.append(f"model.with_box_refine={str(box_refine).lower()}")
    if two_stage is not None:
        overrides.append(f"model.two_stage={str(two_stage).lower()}")
    cfg = load_config(overrides)
    if cfg.model.two_stage and not cfg.model.with_box_refine:
        raise ValueError("HF's DeformableDetr supports two_stage only with box refinement: "
                         "add --box-refine or --no-two-stage")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    # HF's backbone always has frozen BatchNorm and (as Deformable DETR) a frozen stem and layer1.
    cfg["model"]["backbone_frozen_prefixes"] = None
    if "backbone_freeze_bn" in cfg["model"]:
        cfg["model"]["backbone_freeze_bn"] = True
    return cfg


def hf_config(cfg: dict, num_classes: int):
    """A transformers DeformableDetrConfig with the architecture, dropout and matching costs of ``cfg``."""
    import transformers

    m, loss = cfg["model"], cfg["loss"]
    # HF types these as int; they change the matching, not the work, so a fractional one keeps HF's default.
    weights = {hf_key: int(loss[key]) for hf_key, key in (
        ("class_cost", "cost_class"), ("bbox_cost", "cost_bbox"), ("giou_cost", "cost_giou"),
        ("bbox_loss_coefficient", "bbox"), ("giou_loss_coefficient", "giou")) if float(loss[key]).is_integer()}
    return transformers.DeformableDetrConfig(
        backbone=m["backbone_name"], use_timm_backbone=True, use_pretrained_backbone=False,
        d_model=m["d_model"], encoder_layers=m["enc_layers"], decoder_layers=m["dec_layers"],
        encoder_ffn_dim=m["dim_feedforward"], decoder_ffn_dim=m["dim_feedforward"],
        encoder_attention_heads=m["nheads"], decoder_attention_heads=m["nheads"],
        encoder_n_points=m["enc_n_points"], decoder_n_points=m["dec_n_points"],
        num_feature_levels=m["num_feature_levels"], num_queries=m["num_queries"],
        two_stage_num_proposals=m["num_queries"], with_box_refine=m["with_box_refine"], two_stage=m["two_stage"],
        # ours (like the original) drops out after the FFN activation and in the decoder self-attention
        dropout=m["dropout"], attention_dropout=m["dropout"], activation_dropout=m["dropout"],
        activation_function=m["activation"], num_labels=num_classes, auxiliary_loss=loss["aux_loss"],
        focal_alpha=loss["cost_alpha"], **weights)


def build_hf(cfg: dict, num_classes: int, state: dict | None = None) -> torch.nn.Module:
    """HF DeformableDetrForObjectDetection (random init, or ``state``) with only layer2-4 of the backbone
    trainable, as Deformable DETR and ours (transformers 5 leaves a timm backbone's stem trainable)."""
    import transformers

    model = transformers.DeformableDetrForObjectDetection(hf_config(cfg, num_classes))
    if state is not None:
        model.load_state_dict(state, strict=True)
    for name, p in model.model.backbone.named_parameters():
        if not any(f"layer{i}." in name for i in (2, 3, 4)):
            p.requires_grad_(False)
    return model


def build_ours(cfg: dict, num_classes: int, hf_state: dict) -> torch.nn.Module:
    """stepwise's DeformableDETR for ``cfg`` with the HF model's weights."""
    from stepwise.models import build_detector, load_hf_deformable_detr

    model = build_detector(OmegaConf.create(cfg["model"]), OmegaConf.create(cfg["head"]), num_classes).model
    load_hf_deformable_detr(model, hf_state)
    return model


def encoder_tokens(size: tuple[int, int], levels: int) -> int:
    """Positions the encoder sees for an (H, W) image: levels at strides 8, 16, 32, 64, ... (C5 alone: 32)."""
    h, w = size
    first = 3 if levels > 1 else 5  # log2 of the first level's stride
    total = 0
    for i in range(1, first + levels):  # every stride-2 stage rounds up
        h, w = -(-h // 2), -(-w // 2)
        if i >= first:
            total += h * w
    return total


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_same_model(cfg: dict, num_classes: int, hf: torch.nn.Module, ours: torch.nn.Module) -> float:
    """Max |difference| of final logits and boxes in eval mode on one random image; raises when the two
    models differ (then the benchmark would not compare equal work)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, *CHECK_SIZE, generator=g)
    hf.eval(), ours.eval()
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=torch.ones(1, *CHECK_SIZE, dtype=torch.long))
        out = ours(images)
    diff = max(float((out.logits[-1] - ref.logits).abs().max()), float((out.boxes[-1] - ref.pred_boxes).abs().max()))
    if diff > 1e-3:
        raise RuntimeError(f"ours and HF disagree on equal weights (max |difference| {diff:.2e}): the benchmark "
                           "would not compare the same model")
    n_ours, n_hf = trainable_count(ours), trainable_count(hf)
    if n_ours != n_hf:
        raise RuntimeError(f"ours trains {n_ours} parameters, HF {n_hf}: the benchmark would not compare equal work")
    return diff


# ------------------------------------------------------------------------------------------ one step
def make_batch(batch: int, size: tuple[int, int], boxes: int, num_classes: int, device: str):
    """Random images (B, 3, H, W) and B targets of ``boxes`` boxes each (labels (T,), boxes (T, 4) cxcywh)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g)
    targets = []
    for _ in range(batch):
        centres = 0.2 + 0.6 * torch.rand(boxes, 2, generator=g)
        wh = 0.05 + 0.35 * torch.rand(boxes, 2, generator=g)
        targets.append({"labels": torch.randint(num_classes, (boxes,), generator=g),
                        "boxes": torch.cat([centres, wh], 1)})
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


def hf_param_groups(model: torch.nn.Module, stage: dict) -> list[dict]:
    """The same AdamW groups as stepwise.models.param_groups, by HF's parameter names."""
    groups: dict[str, list] = {"backbone": [], "linear_proj": [], "other": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "backbone" if ".backbone." in name else (
                "linear_proj" if "sampling_offsets" in name or "reference_points" in name else "other")
            groups[key].append(p)
    lrs = {"backbone": stage["lr_backbone"], "linear_proj": stage["lr"] * stage["lr_linear_proj_mult"],
           "other": stage["lr"]}
    return [{"params": v, "lr": lrs[k], "weight_decay": stage["weight_decay"]} for k, v in groups.items() if v]


def make_trainer(impl: str, spec: dict, state: dict) -> tuple[Callable[[], float], int]:
    """One implementation with the HF weights ``state``, on ``spec["device"]`` in train mode, with its
    optimizer and batch. Returns ``step() -> loss`` (one full training step) and the trainable count."""
    import stepwise_ops

    cfg, device, classes = spec["cfg"], spec["device"], spec["classes"]
    dtype = DTYPES[spec["dtype"]]
    if impl == "ours-lowp":  # the op in the autocast dtype (model.msda_low_precision)
        cfg = {**cfg, "model": {**cfg["model"], "msda_low_precision": True}}
    model = build_hf(cfg, classes, state) if impl == "hf" else build_ours(cfg, classes, state)
    model.to(device).train()
    images, targets = make_batch(spec["batch"], spec["size"], spec["boxes"], classes, device)
    if impl == "hf":
        optimizer = torch.optim.AdamW(hf_param_groups(model, cfg["stage"]))
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        pixel_mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long, device=device)

        def loss_fn():
            return model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
    else:
        from stepwise.models import Detector, param_groups

        optimizer = torch.optim.AdamW(param_groups(model, cfg["stage"]))
        criterion = Detector.of(model, OmegaConf.create(cfg["loss"])).criterion  # the final decoder layer's head
        backend = "reference" if impl == "ours-reference" else "compiled"  # ours-lowp: compiled too

        def loss_fn():
            stepwise_ops.set_backend(backend)  # a process may hold both variants of ours
            return criterion.total(criterion(model(images), targets))

    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def step() -> float:
        with autocast:
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg["stage"]["clip_max_norm"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"{LABELS[impl]}: non-finite loss {value}")
        return value

    return step, trainable_count(model)


def hf_attention_path(model: torch.nn.Module, device: str) -> str:
    """Which deformable attention HF's model runs on ``device``: one forward of a copy of its first
    MultiScaleDeformableAttention there on small inputs, counting torch.nn.functional.grid_sample calls
    (HF's pure-PyTorch path samples with it; a custom kernel does not)."""
    module = next((m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention"), None)
    if module is None:
        return "unknown (no MultiScaleDeformableAttention module)"
    attn = copy.deepcopy(module).to(device)
    shapes = [(4, 6), (2, 3)]
    n, heads, channels, points = 1, 2, 8, 2
    s = sum(h * w for h, w in shapes)
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    starts = torch.tensor([0, shapes[0][0] * shapes[0][1]], dtype=torch.long, device=device)
    value = torch.randn(n, s, heads, channels, device=device)
    loc = torch.rand(n, 3, heads, len(shapes), points, 2, device=device)
    weights = torch.rand(n, 3, heads, len(shapes), points, device=device).softmax(-1)
    calls = 0
    original = torch.nn.functional.grid_sample

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    forward = type(attn).forward
    where = f"{getattr(forward, '__module__', '?')}.{getattr(forward, '__qualname__', '?')}"
    torch.nn.functional.grid_sample = counting
    try:
        with torch.no_grad():
            attn(value, spatial, shapes, starts, loc, weights, 64)
    except Exception as err:  # noqa: BLE001 - another transformers signature: say so, do not guess
        return f"unknown (probe failed: {type(err).__name__}: {err})"
    finally:
        torch.nn.functional.grid_sample = original
    if "forward" in vars(attn):
        where = "instance forward replaced"
    if calls:
        return f"pure PyTorch (grid_sample, {calls} calls per attention; {where})"
    return f"custom kernel (no grid_sample call; {where})"


def hf_label(path: str) -> str:
    return {"pure": "HF (PyTorch attn)", "custom": "HF (kernel attn)"}.get(path.split()[0], "HF (attn unknown)")


def _load_state(spec: dict) -> dict:
    return torch.load(spec["state_path"], map_location="cpu", weights_only=True)


def time_interleaved(spec: dict, impls: list[str]) -> dict[str, list[float]]:
    """All implementations in one process, their steps interleaved (the order rotating every
    iteration) so that a busy machine slows each alike. Returns the measured seconds per step."""
    torch.manual_seed(0)
    state = _load_state(spec)
    steps = {impl: make_trainer(impl, spec, state)[0] for impl in impls}
    del state
    return interleave(steps, spec)


def interleave(steps: dict[str, Callable[[], float]], spec: dict) -> dict[str, list[float]]:
    """``spec["warmup"]`` + ``spec["iters"]`` rounds of one step of each implementation, the order rotating every
    round so a busy machine slows each alike; returns each one's measured seconds per step (warm-up left out)."""
    device = spec["device"]
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    impls = list(steps)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for i in range(spec["warmup"] + spec["iters"]):
        for impl in impls[i % len(impls):] + impls[:i % len(impls)]:
            sync()
            start = time.perf_counter()
            steps[impl]()
            sync()
            if i >= spec["warmup"]:
                times[impl].append(time.perf_counter() - start)
    return times


def time_and_memory_cuda(spec: dict, impls: list[str]) -> dict[str, dict]:
    """CUDA, one process: each implementation built in turn and its peak memory over its first
    ``MEMORY_STEPS`` steps measured above everything allocated before it (the others' weights and
    optimizer state stay constant), then the interleaved timing. Returns impl -> {times, peak, ...}."""
    torch.manual_seed(0)
    state = _load_state(spec)
    steps, results = {}, {}
    for impl in impls:
        step, trainable = make_trainer(impl, spec, state)
        gc.collect()
        memory = PeakMemory(spec["device"])
        for _ in range(MEMORY_STEPS):
            step()
        results[impl] = {"peak": memory.peak(), "method": memory.method, "trainable": trainable}
        steps[impl] = step
    del state
    for impl, times in interleave(steps, spec).items():
        results[impl]["times"] = times
    return results


def peak_memory(spec: dict, impl: str) -> dict:
    """Peak bytes above the weights over ``MEMORY_STEPS`` training steps (gradients, AdamW state,
    activations) of one implementation; run it in a fresh process (VmHWM is per process)."""
    torch.manual_seed(0)
    state = _load_state(spec)
    step, trainable = make_trainer(impl, spec, state)
    del state
    gc.collect()
    memory = PeakMemory(spec["device"])
    for _ in range(MEMORY_STEPS):
        step()
    return {"peak": memory.peak(), "method": memory.method, "trainable": trainable}


def in_fresh_process(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a new (spawned) process: fresh memory statistics and CUDA state."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ------------------------------------------------------------------------------------------ driver
def implementations(device: str, wanted: list[str]) -> list[str]:
    """The implementations to run: ours with the compiled op and with the reference where the compiled
    op has a kernel for ``device`` (else ours = reference op), and HF."""
    import stepwise_ops

    reason = stepwise_ops.compiled_unavailable_reason(device)
    impls = [i for i in IMPLS if i in wanted]
    if reason is not None and ("ours" in impls or "ours-lowp" in impls):
        print(f"compiled deformable attention unavailable on {device} ({reason}); ours uses the reference op")
        impls = [i for i in impls if i not in ("ours", "ours-lowp")]
        if "ours-reference" not in impls:
            impls.insert(0, "ours-reference")
    return impls


def implementations_for(impls: list[str], dtype: str) -> list[str]:
    """``impls`` for one autocast dtype: the low-precision op variant only where there is autocast."""
    return [i for i in impls if not (i == "ours-lowp" and dtype == "fp32")]


def measure_all(spec: dict, impls: list[str]) -> list[dict]:
    """Step times (one process, interleaved) and peak memory per implementation: on CUDA in that same
    process, on the CPU a fresh process each."""
    if spec["device"].startswith("cuda"):
        results = in_fresh_process(time_and_memory_cuda, spec, impls)
        return [results[impl] for impl in impls]
    times = in_fresh_process(time_interleaved, spec, impls)
    return [{"times": times[impl], **in_fresh_process(peak_memory, spec, impl)} for impl in impls]


def summarize(impls: list[str], results: list[dict], batch: int, dtype: str,
              labels: dict[str, str] = LABELS) -> list[dict]:
    """One row per implementation: images/s, speed vs HF, median step, peak memory and its ratio to HF."""
    ips = {i: batch / statistics.median(r["times"]) for i, r in zip(impls, results)}
    peak = {i: r["peak"] for i, r in zip(impls, results)}
    return [{"dtype": dtype, "impl": impl, "label": labels[impl], "images_per_s": ips[impl],
             "speed_vs_hf": ips[impl] / ips["hf"] if "hf" in ips else None,
             "step_ms": statistics.median(r["times"]) * 1e3, "peak_mib": peak[impl] / 2.0**20,
             "memory_vs_hf": peak[impl] / max(peak["hf"], 1) if "hf" in peak else None,
             "trainable": r["trainable"], "memory_method": r["method"]} for impl, r in zip(impls, results)]


def print_table(rows: list[dict], header: bool = True) -> None:
    """The rows of ``summarize``, then the compiled op vs the reference op (and vs the low-precision op)."""
    if header:
        print(f"peak memory: above the weights, from {rows[0]['memory_method']}; ratios ours / HF")
        print(f"{'dtype':5} {'implementation':21} {'img/s':>8} {'vs HF':>6} {'step ms':>9} {'peak MiB':>9} "
              f"{'vs HF':>6} {'trainable':>10}")
    for r in rows:
        speed = f"{r['speed_vs_hf']:5.2f}x" if r["speed_vs_hf"] is not None else f"{'-':>6}"
        mem = f"{r['memory_vs_hf']:6.2f}" if r["memory_vs_hf"] is not None else f"{'-':>6}"
        print(f"{r['dtype']:5} {r['label']:21} {r['images_per_s']:8.2f} {speed} {r['step_ms']:9.1f} "
              f"{r['peak_mib']:9.1f} {mem} {r['trainable']:10d}", flush=True)
    by = {r["impl"]: r for r in rows}
    for impl, other in (("ours", "ours-reference"), ("ours-lowp", "ours")):
        if impl in by and other in by:
            print(f"{rows[0]['dtype']:5} training step, {by[impl]['label']} vs {by[other]['label']}: "
                  f"{by[impl]['images_per_s'] / by[other]['images_per_s']:.2f}x speed, "
                  f"{by[impl]['peak_mib'] / max(by[other]['peak_mib'], 1e-9):.2f} memory")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=PRESETS, default="tiny", help="configs/model preset")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"))
    parser.add_argument("--iters", type=int, default=10, help="measured steps per process and round")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated autocast dtypes from fp32, bf16, fp16 (default fp32; fp32,bf16 on CUDA)")
    parser.add_argument("--classes", type=int, default=1203, help="number of classes (LVIS: 1203)")
    parser.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image")
    parser.add_argument("--box-refine", action=argparse.BooleanOptionalAction, default=None,
                        help="override the preset's with_box_refine")
    parser.add_argument("--two-stage", action=argparse.BooleanOptionalAction, default=None,
                        help="override the preset's two_stage (HF needs --box-refine with it)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.dtypes = [d for d in (args.dtype or ("fp32,bf16" if args.device.startswith("cuda") else "fp32")).split(",")
                   if d]
    args.impl_list = [i for i in args.impls.split(",") if i]
    if bad := [d for d in args.dtypes if d not in DTYPES]:
        parser.error(f"unknown --dtype {bad}; choose from {sorted(DTYPES)}")
    if bad := [i for i in args.impl_list if i not in IMPLS]:
        parser.error(f"unknown --impls {bad}; choose from {IMPLS}")
    for name in ("batch", "iters", "classes", "boxes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or min(args.size) < 32:
        parser.error("--warmup must be >= 0 and both --size values >= 32 (the backbone's stride)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.two_stage and args.box_refine is False:
        parser.error("HF's DeformableDetr supports --two-stage only with --box-refine")
    return args


def main(argv: list[str] | None = None) -> int:
    import transformers

    args = parse_args(argv)
    cfg = load_bench_config(args.model, args.box_refine, args.two_stage)
    m = cfg["model"]
    print(f"model {args.model}: {m['backbone_name']} (random weights, frozen BN, stem + layer1 frozen), "
          f"d_model {m['d_model']}, {m['enc_layers']}+{m['dec_layers']} layers, {m['nheads']} heads, "
          f"{m['enc_n_points']} points, {m['num_queries']} queries, {m['num_feature_levels']} levels, "
          f"dropout {m['dropout']}, box refine {m['with_box_refine']}, two-stage {m['two_stage']}; "
          f"{args.classes} classes, {args.boxes} boxes/image")
    tokens = encoder_tokens(tuple(args.size), m["num_feature_levels"])
    if m["two_stage"] and tokens < m["num_queries"]:
        raise SystemExit(f"--size {args.size[0]} {args.size[1]}: two-stage keeps {m['num_queries']} proposals but "
                         f"the encoder has only {tokens} positions; use a larger --size")
    torch.manual_seed(0)
    hf = build_hf(cfg, args.classes)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    diff = check_same_model(cfg, args.classes, hf, build_ours(cfg, args.classes, state))
    print(f"equal weights: outputs agree (max |difference| {diff:.1e}), {trainable_count(hf)} trainable parameters")
    hf_attention = hf_attention_path(hf, args.device) if "hf" in args.impl_list else "not run"
    labels = {**LABELS, "hf": hf_label(hf_attention)}
    print(f"HF deformable attention on {args.device}: {hf_attention} (transformers {transformers.__version__})")
    del hf
    impls = implementations(args.device, args.impl_list)
    print(f"device {args.device}, batch {args.batch}, size {args.size[0]}x{args.size[1]}, {args.warmup} warm-up + "
          f"{args.iters} measured steps, interleaved in one process (memory: a fresh process each), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="stepwise_bench_") as tmp:
        state_path = str(Path(tmp) / "hf_state.pt")
        torch.save(state, state_path)
        del state
        for dtype in args.dtypes:
            spec = dict(cfg=cfg, device=args.device, dtype=dtype, classes=args.classes, batch=args.batch,
                        size=tuple(args.size), boxes=args.boxes, warmup=args.warmup, iters=args.iters,
                        state_path=state_path)
            these = implementations_for(impls, dtype)
            table = summarize(these, measure_all(spec, these), args.batch, dtype, labels)
            print_table(table, header=dtype == args.dtypes[0])
            rows += table
    if args.json is not None:
        from stepwise.utils.io import atomic_write_json

        gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
        atomic_write_json(args.json, {
            "model": args.model, "device": args.device, "gpu": gpu, "batch": args.batch, "size": list(args.size),
            "iters": args.iters, "warmup": args.warmup, "torch": torch.__version__,
            "transformers": transformers.__version__, "hf_attention": hf_attention,
            "equal_weights_max_diff": diff, "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
