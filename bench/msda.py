"""Multi-scale deformable attention: each implementation against the pure-PyTorch reference.

    python bench/msda.py --device cpu --repeats 3 --shapes encoder,decoder
    python bench/msda.py --device cuda --repeats 20 --json msda.json

Shapes (Deformable DETR): batch 2, levels (100,167),(50,84),(25,42),(13,21), 8 heads x 32 channels,
4 levels x 4 points; encoder queries = all 22,223 pixels, decoder = 300 queries; sampling points
N(0, 2 px) around each query's reference point (pixel centres for the encoder, random for the decoder).
Times are medians over --repeats after one warm-up. Peak memory above the inputs: on CUDA
torch.cuda.max_memory_allocated; on the CPU the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs; ru_maxrss where that is not allowed), each implementation in a fresh process.
Ratios: speed = reference time / time (higher is faster), memory = peak / reference peak.

Bandwidth floor (CUDA): the least bytes any implementation must move through device memory for these
inputs in its dtype, divided by the device's copy bandwidth. --bandwidth measure (the default) measures it
on the device first: a 1 GiB device-to-device copy timed with CUDA events (10 copies after 2 warm-ups,
bytes read + written), printed with the GPU's name; --bandwidth 3.35e12 gives a figure instead (bytes/s). Forward: the value rows the sampling points touch (unique
(batch, pixel, head) corners inside the maps, x channels), locations, weights, output. Backward adds
grad_output, those value rows, locations and weights read again, and grad_value (whole tensor),
grad_locations, grad_weights written. "floor" = that time / measured time (1.00 = bandwidth bound).
--json PATH writes every row (times, memory, ratios, floors) for bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
HEADS, CHANNELS, POINTS, BATCH = 8, 32, 4, 2
SHAPES = {"encoder": sum(h * w for h, w in LEVELS), "decoder": 300}
COPY_BYTES = 1 << 30  # the copy that measures the device's bandwidth
COPY_REPEATS = 10


def measure_copy_bandwidth(device: str, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + written), the median of ``repeats`` copies
    after two warm-ups: CUDA events on a GPU, the wall clock on the CPU."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    cuda = device.startswith("cuda")
    times = []
    for i in range(repeats + 2):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 2:
            times.append(seconds)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def implementations(device: str) -> list[tuple[str, str, torch.dtype]]:
    """(label, backend, dtype) for every implementation available on the device; the reference first."""
    import stepwise_ops

    impls = [("reference fp32", "reference", torch.float32)]
    if stepwise_ops.compiled_unavailable_reason(device) is None:
        kernel = "CUDA" if device.startswith("cuda") else "CPU kernel"
        impls.append((f"{kernel} fp32", "compiled", torch.float32))
        if device.startswith("cuda"):
            impls += [(f"{kernel} fp16", "compiled", torch.float16), (f"{kernel} bf16", "compiled", torch.bfloat16)]
    else:
        print(f"compiled op unavailable on {device}: {stepwise_ops.compiled_unavailable_reason(device)}")
    return impls


def reference_points(queries: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """(Lq, 2) normalised (x, y): the encoder's queries are the pixel centres of every level, in order;
    the decoder's are random points, as after training."""
    if queries != SHAPES["encoder"]:
        return torch.rand(queries, 2, generator=generator, device=device)
    centres = []
    for h, w in LEVELS:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w, indexing="ij"
        )
        centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    return torch.cat(centres)


def make_inputs(queries: int, dtype: torch.dtype, device: str):
    """Deformable DETR-like inputs: sampling points a few pixels (N(0, 2 px)) around each query's reference point."""
    g = torch.Generator(device=device).manual_seed(0)
    spatial = torch.tensor(LEVELS, dtype=torch.long, device=device)
    areas = spatial.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s, n_levels = int(areas.sum()), len(LEVELS)
    value = torch.randn(BATCH, s, HEADS, CHANNELS, generator=g, device=device, dtype=dtype)
    ref = reference_points(queries, g, device).view(1, queries, 1, 1, 1, 2)
    offsets = 2.0 * torch.randn(BATCH, queries, HEADS, n_levels, POINTS, 2, generator=g, device=device)
    loc = (ref + offsets / spatial.flip(-1).view(1, 1, 1, n_levels, 1, 2)).to(dtype)
    attn = torch.rand(BATCH, queries, HEADS, n_levels * POINTS, generator=g, device=device).softmax(-1)
    attn = attn.view(BATCH, queries, HEADS, n_levels, POINTS).to(dtype)
    grad = torch.randn(BATCH, queries, HEADS * CHANNELS, generator=g, device=device, dtype=dtype)
    return value, spatial, starts, loc, attn, grad


def touched_value_rows(loc: torch.Tensor, spatial: torch.Tensor, starts: torch.Tensor) -> int:
    """Unique (batch, flattened pixel, head) value rows that bilinear sampling at ``loc`` reads.

    loc (N, Lq, M, L, P, 2) in [0, 1], x first; spatial (L, 2) (H, W); starts (L,). Pixel = loc * size - 0.5
    (the op's convention); of each sample's four corners those inside the map count."""
    n, _, m, levels, _, _ = loc.shape
    keys = []
    batch = torch.arange(n, device=loc.device).view(n, 1, 1, 1)
    head = torch.arange(m, device=loc.device).view(1, 1, m, 1)
    for lvl in range(levels):
        h, w = int(spatial[lvl, 0]), int(spatial[lvl, 1])
        x = loc[:, :, :, lvl, :, 0].double() * w - 0.5
        y = loc[:, :, :, lvl, :, 1].double() * h - 0.5
        x0, y0 = x.floor().long(), y.floor().long()
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                pixel = int(starts[lvl]) + yi * w + xi
                key = (batch * int(spatial.prod(1).sum()) + pixel) * m + head
                keys.append(key[inside])
    return int(torch.unique(torch.cat(keys)).numel())


def bytes_moved(shape: str, dtype: torch.dtype, touched_rows: int) -> tuple[int, int]:
    """(forward, forward + backward) least bytes through device memory for the bench's ``shape`` in
    ``dtype``, given the value rows the sampling reads (``touched_value_rows``); see the module docstring."""
    e = torch.empty(0, dtype=dtype).element_size()
    queries, levels = SHAPES[shape], len(LEVELS)
    value = BATCH * sum(h * w for h, w in LEVELS) * HEADS * CHANNELS
    samples = BATCH * queries * HEADS * levels * POINTS
    read_value, loc, attn, out = touched_rows * CHANNELS, 2 * samples, samples, BATCH * queries * HEADS * CHANNELS
    forward = read_value + loc + attn + out
    backward = out + read_value + loc + attn + value + loc + attn
    return e * forward, e * (forward + backward)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


class PeakMemory:
    """Peak bytes above the level at construction: CUDA allocator stats; on the CPU the process's resident
    set high-water mark (VmHWM, reset through /proc/self/clear_refs) above the current RSS, or, where
    that reset is not allowed, the rise of getrusage's ru_maxrss."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM"
        if self.cuda:
            torch.cuda.synchronize(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024
        except OSError:
            self.method = "ru_maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        if self.method == "VmHWM":
            return _proc_status_kib("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def measure(shape: str, backend: str, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Median forward and forward+backward seconds and their peak memory (bytes) for one implementation."""
    import stepwise_ops

    fn = stepwise_ops.ms_deform_attn_reference if backend == "reference" else stepwise_ops.ms_deform_attn_compiled
    value, spatial, starts, loc, attn, grad = make_inputs(SHAPES[shape], dtype, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(step) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run is the warm-up
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def forward():
        with torch.no_grad():
            fn(value, spatial, starts, loc, attn)

    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]

    def forward_backward():
        fn(leaves[0], spatial, starts, leaves[1], leaves[2]).backward(grad)
        for t in leaves:
            t.grad = None

    memory = PeakMemory(device)
    result = {"fwd_s": timed(forward), "fwd_mem": memory.peak()}
    memory = PeakMemory(device)
    result["fwdbwd_s"] = timed(forward_backward)
    result["fwdbwd_mem"] = memory.peak()
    result["fwd_bytes"], result["fwdbwd_bytes"] = bytes_moved(shape, dtype, touched_value_rows(loc, spatial, starts))
    return result


def _measure_in_child(args) -> dict:
    return measure(*args)


def run(shapes: list[str], device: str, repeats: int, bandwidth: float | None = None,
        copy_bytes: int = COPY_BYTES) -> dict:
    """Measure every implementation on every shape, print the table; returns the rows (see --json).
    ``bandwidth``: bytes/s for the floor; None measures the device's copy bandwidth first."""
    torch.set_grad_enabled(True)
    impls = implementations(device)
    cuda = device.startswith("cuda")
    name = device_name(device)
    if bandwidth is None:
        bandwidth = measure_copy_bandwidth(device, copy_bytes)
        source = f"measured: {copy_bytes / 2**30:g} GiB device-to-device copy, read + written"
    else:
        source = "given with --bandwidth"
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.3g} TB/s ({source})"
          + ("; the floor below uses it" if cuda else "; no floor on the CPU"))
    print(f"device {device}, repeats {repeats}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"peak memory from {PeakMemory(device).method}"
          + (f", bandwidth floor at {bandwidth / 1e12:.3g} TB/s" if cuda else ""))
    header = f"{'shape':8} {'implementation':16} {'fwd ms':>9} {'speed':>6} {'f+b ms':>9} {'speed':>6} " \
             f"{'fwd MiB':>8} {'ratio':>6} {'f+b MiB':>8} {'ratio':>6}"
    print(header + (f" {'fwd floor':>9} {'f+b floor':>9}" if cuda else ""))
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for shape in shapes:
        ref = None
        for label, backend, dtype in impls:
            args = (shape, backend, dtype, device, repeats)
            if cuda:
                r = measure(*args)
            else:  # a fresh process: the RSS high-water mark is per process
                with ctx.Pool(1) as pool:
                    r = pool.apply(_measure_in_child, (args,))
            ref = ref or r
            row = {"shape": shape, "implementation": label, "backend": backend, "dtype": str(dtype).split(".")[-1],
                   **r, "fwd_speed": ref["fwd_s"] / r["fwd_s"], "fwdbwd_speed": ref["fwdbwd_s"] / r["fwdbwd_s"],
                   "fwd_mem_ratio": r["fwd_mem"] / max(ref["fwd_mem"], 1),
                   "fwdbwd_mem_ratio": r["fwdbwd_mem"] / max(ref["fwdbwd_mem"], 1),
                   "fwd_floor": r["fwd_bytes"] / bandwidth / r["fwd_s"],
                   "fwdbwd_floor": r["fwdbwd_bytes"] / bandwidth / r["fwdbwd_s"]}
            rows.append(row)
            mib = 2.0**20
            print(
                f"{shape:8} {label:16} {r['fwd_s'] * 1e3:9.1f} {row['fwd_speed']:5.1f}x "
                f"{r['fwdbwd_s'] * 1e3:9.1f} {row['fwdbwd_speed']:5.1f}x "
                f"{r['fwd_mem'] / mib:8.1f} {row['fwd_mem_ratio']:6.2f} "
                f"{r['fwdbwd_mem'] / mib:8.1f} {row['fwdbwd_mem_ratio']:6.2f}"
                + (f" {row['fwd_floor']:9.2f} {row['fwdbwd_floor']:9.2f}" if cuda else ""),
                flush=True,
            )
    return {"device": device, "torch": torch.__version__, "repeats": repeats, "bandwidth": bandwidth,
            "bandwidth_source": source, "device_name": name,
            "gpu": torch.cuda.get_device_name(device) if cuda else None, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="encoder,decoder", help="comma-separated: encoder, decoder")
    parser.add_argument("--bandwidth", default="measure",
                        help="bytes/s for the bandwidth floor, or 'measure' (default): the device's copy bandwidth")
    parser.add_argument("--copy-mib", type=int, default=COPY_BYTES >> 20,
                        help="size of the copy that measures the bandwidth (default 1024)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.bandwidth == "measure":
        bandwidth = None
    else:
        try:
            bandwidth = float(args.bandwidth)
        except ValueError:
            parser.error(f"--bandwidth must be 'measure' or bytes/s, got {args.bandwidth!r}")
        if bandwidth <= 0:
            parser.error("--bandwidth must be > 0")
    if args.copy_mib < 1:
        parser.error("--copy-mib must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    result = run(shapes, args.device, args.repeats, bandwidth, args.copy_mib << 20)
    if args.json is not None:
        from stepwise.utils.io import atomic_write_json

        atomic_write_json(args.json, result, indent=1)


if __name__ == "__main__":
    main()
