"""Training step time of the engine's AdamW: ``fused=True`` (one kernel for the whole update, the engine's
choice) vs ``foreach=True`` (multi-tensor, the engine's earlier choice), on one real batch stream.

    python bench/optimizer_step.py                          # the study proxy: model=tiny, data=synthetic_study
    python bench/optimizer_step.py data=synthetic           # the README demo's data (128-160 px images)

Both optimizers update two copies of the same model from the same weights on the same batches, their steps
interleaved so that a busy machine slows both alike. Per step it times data loading, forward + loss + backward
(+ gradient clipping, as the engine) and the optimizer step; prints medians and the ratio foreach / fused
(> 1: fused is faster), and checks that the two copies still agree after the steps (max abs weight diff).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

from stepwise.config import load_config
from stepwise.engine import TrainSettings, detection_forward, make_accelerator, weighted_total
from stepwise.models import param_groups
from stepwise.stages.parts import build_datasets, build_loaders, build_model, ensure_data


def main(argv: list[str]) -> None:
    steps = 40
    cfg = load_config(["stage=pretrain", "data=synthetic_study", "data.preflight=false", "stage.trackers=[]",
                       "exp=bench_optimizer_step", *argv])
    accelerator = make_accelerator(TrainSettings.from_config(cfg), "/tmp/bench_optimizer_step")
    ensure_data(cfg, accelerator)
    train_ds, val_ds = build_datasets(cfg)
    loader, _ = build_loaders(cfg, train_ds, val_ds)
    model, criterion, _ = build_model(cfg, train_ds.categories, accelerator)
    models = {"foreach": model}
    models["fused"] = copy.deepcopy(models["foreach"])
    optimizers = {name: torch.optim.AdamW(param_groups(m, cfg.stage), lr=float(cfg.stage.lr),
                                          weight_decay=float(cfg.stage.weight_decay), **{name: True})
                  for name, m in models.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"data": [], "model": [], "optimizer": []} for n in models}
    batches = iter(loader)
    for step in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        data_s = time.perf_counter() - t0
        for name in (("foreach", "fused") if step % 2 else ("fused", "foreach")):
            model, optimizer = models[name], optimizers[name]
            model.train()
            t1 = time.perf_counter()
            outputs, targets = detection_forward(model, batch)
            weighted_total(criterion(outputs, targets), criterion.weight_dict).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.stage.clip_max_norm))
            t2 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if step >= 5:  # warm-up steps are not timed
                times[name]["data"].append(data_s)
                times[name]["model"].append(t2 - t1)
                times[name]["optimizer"].append(t3 - t2)
    median = {n: {k: statistics.median(v) * 1e3 for k, v in t.items()} for n, t in times.items()}
    total = {n: sum(m.values()) for n, m in median.items()}
    drift = max((a - b).abs().max().item() for a, b in zip(models["foreach"].parameters(), models["fused"].parameters()))
    params = sum(p.numel() for p in models["fused"].parameters() if p.requires_grad)
    print(f"data={cfg.data.preset} batch={cfg.data.batch_size} model={cfg.model.name} ({params / 1e6:.2f} M trained "
          f"parameters), {steps - 5} timed steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| AdamW | data ms | forward+loss+backward ms | optimizer ms | step ms | images/s |")
    print("|---|---|---|---|---|---|")
    for name, m in median.items():
        print(f"| {name} | {m['data']:.1f} | {m['model']:.1f} | {m['optimizer']:.1f} | {total[name]:.1f} | "
              f"{int(cfg.data.batch_size) * 1e3 / total[name]:.1f} |")
    print(f"optimizer step foreach / fused: {median['foreach']['optimizer'] / median['fused']['optimizer']:.2f}x; "
          f"whole step foreach / fused: {total['foreach'] / total['fused']:.2f}x; "
          f"max |weight difference| after {steps} steps: {drift:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
