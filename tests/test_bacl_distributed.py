"""BACL's indicator and FHM increments are summed over processes: two CPU processes (gloo) end with the
same statistics as one process that saw every sample, and with each other's after a head.loss step.

The test launches this file itself twice (``python tests/test_bacl_distributed.py RANK WORLD INIT OUT``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Per rank: (foreground logits (N, 3), labels (N,)) for the indicators, (features (N, 2), labels) for FHM.
SAMPLES = {
    0: (torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]),
        torch.tensor([[1.0, 2.0]]), torch.tensor([0])),
    1: (torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]]), torch.tensor([1, 1]),
        torch.tensor([[3.0, 4.0], [5.0, 5.0]]), torch.tensor([0, 1])),
}


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from stepwise.heads.bacl import BACLHead
    from stepwise.heads.fhm import FeatureHallucination
    from stepwise.heads.indicators import LongTermIndicators

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z, y, feats, fy = SAMPLES[rank]
    ind = LongTermIndicators(3, momentum=0.5)
    ind.update(z, y)
    fhm = FeatureHallucination(3, 2, momentum=0.5)
    fhm.update(feats, fy)

    # a full training step of the head: different matched queries on each process, FHM on
    torch.manual_seed(0)
    head = BACLHead(2, 3)
    logits = torch.randn(1, 4, 4) + rank
    features = torch.randn(1, 4, 2) + rank
    matches = [(torch.tensor([rank, 3]), torch.tensor([0, 1]))]
    targets = [{"labels": torch.tensor([rank, 2]), "boxes": torch.rand(2, 4)}]
    losses = head.loss(logits, matches, targets, num_boxes=2.0, features=features, layer="")
    torch.save({"indicators": ind.state(), "fhm": fhm.state(), "head": head.state,
                "loss_fhm": float(losses["loss_fhm"])}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_share_statistics(tmp_path):
    from stepwise.heads.fhm import FeatureHallucination
    from stepwise.heads.indicators import LongTermIndicators

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(init), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # hand-computed: class 0 has one sample (rank 0), class 1 two (rank 1), class 2 none
    ind = ranks[0]["indicators"]
    assert ind["class_count"].tolist() == [1.0, 2.0, 0.0]
    assert ind["tpr_hits"].tolist() == [1.0, 2.0, 0.0]
    e = math.exp
    row1 = [(1 / (e(1) + 2) + 1 / (e(3) + 2)) / 2, (e(1) / (e(1) + 2) + e(3) / (e(3) + 2)) / 2]
    assert ind["confusion_sum"][1, :2].tolist() == pytest.approx([2 * v for v in row1], rel=1e-6)

    def sig(x: float) -> float:
        return 1 / (1 + e(-x))

    assert ind["score_ema"].tolist() == pytest.approx([sig(2.0), (sig(1.0) + sig(3.0)) / 2, 0.0], rel=1e-6)
    fhm = ranks[0]["fhm"]
    assert fhm["mean"].tolist() == [[2.0, 3.0], [5.0, 5.0], [0.0, 0.0]]
    assert fhm["var"].tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]

    # the same as one process that saw every sample
    single_ind, single_fhm = LongTermIndicators(3, momentum=0.5), FeatureHallucination(3, 2, momentum=0.5)
    single_ind.update(torch.cat([SAMPLES[0][0], SAMPLES[1][0]]), torch.cat([SAMPLES[0][1], SAMPLES[1][1]]))
    single_fhm.update(torch.cat([SAMPLES[0][2], SAMPLES[1][2]]), torch.cat([SAMPLES[0][3], SAMPLES[1][3]]))
    for key, value in single_ind.state().items():
        assert torch.allclose(ranks[1]["indicators"][key], value), key
    for key, value in single_fhm.state().items():
        assert torch.allclose(ranks[1]["fhm"][key], value), key

    # after a head.loss step with different samples per process, both hold identical statistics that
    # count both processes' matched queries (classes 0, 1 and 2 twice) and their synthetic features
    for key, value in ranks[0]["head"].items():
        assert torch.equal(ranks[1]["head"][key], value), key
    assert ranks[0]["head"]["fhm.count"].tolist() == [1.0, 1.0, 2.0]
    assert ranks[0]["head"]["indicators.class_count"].sum().item() == 4 + 2 * 3 * 12  # 3 classes x m, twice


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
