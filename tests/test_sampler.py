"""Repeat factor sampling: hand-computed factors, per-epoch stochastic rounding, Accelerate sharding."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from stepwise.data import RepeatFactorSampler, repeat_factors_from_dataset


class _Table:
    """A dataset stand-in: only ``__len__`` and ``image_classes`` (what RFS reads)."""

    def __init__(self, classes):
        self.classes = classes

    def __len__(self):
        return len(self.classes)

    def image_classes(self, i):
        return self.classes[i]


def test_repeat_factors_hand_computed():
    # 10 images, threshold t = 0.4; images 8 and 9 have no annotations but count in the denominator.
    #   class 0 in images 0..7  -> f = 8/10 = 0.8 -> r = max(1, sqrt(0.4/0.8) = 0.707) = 1
    #   class 1 in images 0, 1  -> f = 0.2        -> r = sqrt(0.4/0.2) = sqrt(2) = 1.41421356
    #   class 2 in image 2      -> f = 0.1        -> r = sqrt(0.4/0.1) = 2
    #   class 3 in images 2..5  -> f = 0.4        -> r = sqrt(1) = 1
    # image factor = max over its classes: img0 = img1 = 1.41421356, img2 = max(1, 2, 1) = 2, others 1.
    table = _Table([{0, 1}, {0, 1}, {0, 2, 3}, {0, 3}, {0, 3}, {0, 3}, {0}, {0}, set(), set()])
    factors = repeat_factors_from_dataset(table, threshold=0.4)
    expected = [math.sqrt(2), math.sqrt(2), 2.0, 1, 1, 1, 1, 1, 1, 1]
    assert factors.shape == (10,) and torch.allclose(factors, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors_from_dataset(table, threshold=0)


def test_stochastic_rounding_per_epoch():
    factors = torch.tensor([1.5] * 100 + [1.0] * 50 + [2.25] * 10 + [0.0] * 3, dtype=torch.float64)
    a, b = RepeatFactorSampler(factors, seed=7), RepeatFactorSampler(factors, seed=7)
    for sampler in (a, b):
        sampler.set_epoch(3)
    assert list(a) == list(b)  # same (seed, epoch): identical, as on every process
    epoch3 = list(a)
    a.set_epoch(4)
    assert list(a) != epoch3 and len(a) == len(list(a))
    a.set_epoch(3)
    assert list(a) == epoch3  # re-drawn only from (seed, epoch)
    assert list(RepeatFactorSampler(factors, seed=8).indices_for_epoch(3).tolist()) != epoch3
    counts = Counter(epoch3)
    for i, f in enumerate(factors.tolist()):
        assert counts.get(i, 0) in (math.floor(f), math.ceil(f))
    assert a.expected_length == pytest.approx(100 * 1.5 + 50 + 22.5)
    ordered = RepeatFactorSampler(factors, seed=7, shuffle=False)
    ordered.set_epoch(3)
    assert list(ordered) == sorted(epoch3)


def _shards(factors, num_processes, batch_size, **kwargs):
    """Prepare one loader per simulated process, each with its own sampler built from the same inputs."""
    loaders = []
    for rank in range(num_processes):
        base = DataLoader(list(range(len(factors))), batch_size=batch_size,
                          sampler=RepeatFactorSampler(factors, seed=11), collate_fn=list)
        loaders.append(prepare_data_loader(base, num_processes=num_processes, process_index=rank,
                                           put_on_device=False, **kwargs))
    return loaders


@pytest.mark.parametrize("batch_size", [2, 3])
def test_two_processes_disjoint_complete_shards(batch_size):
    factors = torch.tensor([1.0, 2.5, 1.3, 1.0, 3.0, 1.0, 1.7, 1.0, 1.0, 1.2, 1.0], dtype=torch.float64)
    loaders = _shards(factors, 2, batch_size)
    reference = RepeatFactorSampler(factors, seed=11)
    for epoch in (0, 1, 5):
        batches = []
        for loader in loaders:
            loader.set_epoch(epoch)
            # set_epoch went through DataLoaderShard -> BatchSamplerShard -> BatchSampler -> our sampler
            assert loader.batch_sampler.batch_sampler.sampler.epoch == epoch
            batches.append(list(loader))
        full = reference.indices_for_epoch(epoch).tolist()
        for loader in loaders:  # the same repeats and order on both processes
            assert list(loader.batch_sampler.batch_sampler.sampler) == full
        # even_batches=True: both shards get the same number of full batches; round-robin order p0, p1, p0, ...
        assert len(batches[0]) == len(batches[1]) == len(loaders[0])
        assert all(len(b) == batch_size for shard in batches for b in shard)
        interleaved = [i for pair in zip(*batches) for b in pair for i in b]
        pad = len(interleaved) - len(full)
        assert 0 <= pad < 2 * batch_size
        # disjoint and complete: the epoch's list once, then padding taken from the start of the same list
        assert interleaved == full + full[:pad]
    # different epochs give different lists (stochastic rounding and order re-drawn)
    assert reference.indices_for_epoch(0).tolist() != reference.indices_for_epoch(1).tolist()


def test_uneven_batches_exact_partition():
    factors = torch.full((9,), 1.5, dtype=torch.float64)
    loaders = _shards(factors, 2, 2, even_batches=False)
    for loader in loaders:
        loader.set_epoch(2)
    shards = [[i for b in loader for i in b] for loader in loaders]
    full = RepeatFactorSampler(factors, seed=11).indices_for_epoch(2).tolist()
    assert Counter(shards[0]) + Counter(shards[1]) == Counter(full)  # no padding, nothing missing
    assert len(shards[0]) + len(shards[1]) == len(full)


def test_epoch_advances_without_set_epoch():
    factors = torch.full((8,), 1.5, dtype=torch.float64)
    (loader,) = _shards(factors, 1, 2)
    first, second = [i for b in loader for i in b], [i for b in loader for i in b]
    reference = RepeatFactorSampler(factors, seed=11)
    assert first == reference.indices_for_epoch(0).tolist()
    assert second == reference.indices_for_epoch(1).tolist()  # DataLoaderShard counts passes as epochs


def test_bad_factors():
    with pytest.raises(ValueError, match="finite and >= 0"):
        RepeatFactorSampler(torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("rfs_epoch", ["dataset", "repeated"])
def test_pretrain_rfs_epoch_length(tmp_path, rfs_epoch):
    """data.rfs_epoch=dataset: RFS changes the mix of a pre-training epoch, not its length (equal steps to
    uniform sampling); repeated: the whole repeated list (sum of the factors, more steps)."""
    from stepwise.config import load_config
    from stepwise.data.synthetic import ensure_synthetic
    from stepwise.stages import parts

    root = ensure_synthetic(tmp_path / "data", "tiny", 0, workers=1, verbose=False)
    cfg = load_config([f"data.root={root}", "data.preset=tiny", "data.rfs_threshold=0.3", "data.preflight=false",
                       f"data.rfs_epoch={rfs_epoch}"])
    train_ds, val_ds = parts.build_datasets(cfg)
    loader, _ = parts.build_loaders(cfg, train_ds, val_ds)
    factors = repeat_factors_from_dataset(train_ds, 0.3)
    assert float(factors.sum()) > 1.2 * len(train_ds)  # the threshold repeats a good share of the images
    if rfs_epoch == "dataset":
        assert len(loader.sampler) == len(train_ds)
        counts = Counter(loader.sampler.indices_for_epoch(0).tolist())
        assert len(counts) < len(train_ds)  # repeated images take the place of others
    else:
        assert abs(len(loader.sampler) - float(factors.sum())) < 0.1 * len(train_ds)
