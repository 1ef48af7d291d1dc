"""Extraction speed: the full FeatureExtractor path against the raw forward pass, and the cached rerun.

For each backbone, in the same process and interleaved over ``--repeats`` runs:

* raw forward: images already decoded, transformed and stacked into tensors; only ``backbone(x)`` is timed;
* full path: ``FeatureExtractor.transform(paths)`` into an empty cache (hash, decode, transform, forward,
  cache write);
* cached rerun: the same call again (a new extractor instance): lookup and memory-mapped read.

It prints a table and writes ``benchmarks/results/extract_speed.{md,json}``. Medians over the repeats;
ratios are against the raw forward measured in the same run. Peak memory is the process's resident set
size above its level when the phase started (sampled every 5 ms), plus ``torch.cuda.max_memory_allocated``
on a GPU. The open_clip ViTs are built without weights (randomly initialised): speed does not depend on
the weights, and no weights can be downloaded here. The CPU time that other processes used during each
backbone's phase (``/proc/stat`` minus this process) is recorded: on a shared machine it flags rows whose
ratios are not representative.

Usage::

    python benchmarks/extract_speed.py                  # quick: 64 images, 3 repeats
    python benchmarks/extract_speed.py --full           # 512 images, 5 repeats
    python benchmarks/extract_speed.py --device cuda    # adds ViT-B-32 with bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from luab_sk._utils import resolve_device  # noqa: E402
from luab_sk.features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, FeatureExtractor, load_backbone  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class PeakRSS:
    """Peak resident memory (MiB) above the level at entry, sampled by a background thread."""

    def __init__(self, interval=0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self):
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mib = (max(self.peak, self._rss()) - self.base) / 2**20


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, CPU seconds used by this process) since boot / start."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    times = os.times()
    return machine, times.user + times.system


def make_photos(folder: Path, n: int, long_side: tuple[int, int] | None = None) -> list[str]:
    """JPEG files of varied sizes cut from scikit-image's bundled photos (real decode work).

    With ``long_side=(low, high)`` each crop is resized (bicubic) so that its long side is drawn uniformly
    from that range, as ImageNet's photos are (``benchmarks/gpu_decode.py`` uses (400, 1000)).
    """
    from skimage import data

    sources = [data.coffee(), data.chelsea(), data.astronaut(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(np.ascontiguousarray(src[y : y + ch, x : x + cw, :3]))
        if long_side is not None:
            scale = rng.uniform(*long_side) / max(img.size)
            size = (round(img.size[0] * scale), round(img.size[1] * scale))
            img = img.resize(size, Image.Resampling.BICUBIC)
        path = folder / f"photo_{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def raw_forward(backbone, tensors, batch_size, device, precision, outputs):
    model = backbone.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # as FeatureExtractor does on a GPU
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    batches = [tensors[i : i + batch_size] for i in range(0, len(tensors), batch_size)]
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if autocast is not None:
            autocast.__enter__()
        for x in batches:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.to(memory_format=torch.channels_last)
            out = model(x, outputs=outputs)
            for v in out.values():
                v.float().cpu()
        if autocast is not None:
            autocast.__exit__(None, None, None)
    sync(device)
    return len(tensors) / (time.perf_counter() - t0)


def bench(config, paths, args, device):
    name, pretrained, output, precision = (
        config["backbone"],
        config["pretrained"],
        config["output"],
        config["precision"],
    )
    outputs = ("pooled", "tokens") if output == "both" else (output,)
    backbone = load_backbone(name, pretrained)
    transform = backbone.eval_transform()
    tensors = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    params = dict(
        backbone=name,
        pretrained=pretrained,
        output=output,
        device=str(device),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        precision=precision,
    )
    FeatureExtractor(**params).transform(paths[: args.batch_size])  # warm-up (and builds the shared backbone)
    raw, full, cached, mem_full, mem_cached, gpu_mem = [], [], [], [], [], []
    for _ in range(args.repeats):
        raw.append(raw_forward(backbone, tensors, args.batch_size, device, precision, outputs))
        with tempfile.TemporaryDirectory() as cache_dir:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as mem:
                sync(device)
                t0 = time.perf_counter()
                FeatureExtractor(**params, cache_dir=cache_dir).transform(paths)
                sync(device)
                t_full = time.perf_counter() - t0
            mem_full.append(mem.mib)
            if device.type == "cuda":
                gpu_mem.append(torch.cuda.max_memory_allocated() / 2**20)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                again = FeatureExtractor(**params, cache_dir=cache_dir)
                again.transform(paths)
                t_cached = time.perf_counter() - t0
            assert again.n_encoded_ == 0
            mem_cached.append(mem.mib)
        full.append(len(paths) / t_full)
        cached.append(len(paths) / t_cached)
    med = statistics.median
    return {
        "backbone": name,
        "weights": "pretrained" if pretrained else "random init",
        "output": output,
        "precision": precision,
        "raw_img_s": med(raw),
        "full_img_s": med(full),
        "full_over_raw": med(f / r for f, r in zip(full, raw)),
        "cached_img_s": med(cached),
        "cached_speedup": med(c / f for c, f in zip(cached, full)),
        "peak_rss_full_mib": med(mem_full),
        "peak_rss_cached_mib": med(mem_cached),
        "peak_gpu_mib": med(gpu_mem) if gpu_mem else None,
        "runs": {"raw": raw, "full": full, "cached": cached},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full size: 512 images, 5 repeats")
    parser.add_argument("--n-images", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    args.n_images = args.n_images or (512 if args.full else 64)
    args.repeats = args.repeats or (5 if args.full else 3)
    device = resolve_device(args.device)
    configs = [
        {
            "backbone": DEFAULT_BACKBONE,
            "pretrained": DEFAULT_PRETRAINED,
            "output": "pooled",
            "precision": "fp32",
        },
        {
            "backbone": DEFAULT_BACKBONE,
            "pretrained": DEFAULT_PRETRAINED,
            "output": "tokens",
            "precision": "fp32",
        },
        {"backbone": "open_clip:ViT-S-32-alt", "pretrained": None, "output": "pooled", "precision": "fp32"},
        {"backbone": "open_clip:ViT-B-32", "pretrained": None, "output": "pooled", "precision": "fp32"},
    ]
    if device.type == "cuda":
        configs.append(
            {"backbone": "open_clip:ViT-B-32", "pretrained": None, "output": "pooled", "precision": "bf16"}
        )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        paths = make_photos(Path(folder), args.n_images)
        rows = []
        for c in configs:
            (machine0, own0), t0 = cpu_seconds(), time.perf_counter()
            rows.append(bench(c, paths, args, device))
            (machine1, own1), wall = cpu_seconds(), time.perf_counter() - t0
            rows[-1]["other_processes_cpu_cores"] = max(0.0, (machine1 - machine0) - (own1 - own0)) / wall
    load_after = os.getloadavg()[0]
    env = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "n_images": args.n_images,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1min_before_after": [round(load_before, 1), round(load_after, 1)],
        "other_processes_cpu_cores_max": round(max(r["other_processes_cpu_cores"] for r in rows), 2),
        "cpu_count": os.cpu_count(),
    }
    header = (
        "| backbone | weights | output | precision | raw fwd img/s | full path img/s | full/raw | "
        "cached img/s | cached speed-up | peak RSS full (MiB) | peak RSS cached (MiB) | peak GPU (MiB) |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        lines.append(
            f"| {r['backbone']} | {r['weights']} | {r['output']} | {r['precision']} | {r['raw_img_s']:.1f} | "
            f"{r['full_img_s']:.1f} | {r['full_over_raw']:.2f} | {r['cached_img_s']:.0f} | "
            f"{r['cached_speedup']:.0f}x | {r['peak_rss_full_mib']:.0f} | {r['peak_rss_cached_mib']:.0f} | "
            f"{gpu} |"
        )
    notes = [
        "",
        f"Environment: {json.dumps(env)}",
        "",
        "Medians over the repeats; full/raw and the cached speed-up are per-run ratios against the raw "
        "forward and the first (full) run measured in the same repeat. Targets: full/raw >= 0.90 on CPU; "
        "cached speed-up >= 100x.",
    ]
    busy = [r["backbone"] + " " + r["output"] for r in rows if r["other_processes_cpu_cores"] > 0.25]
    if busy:
        notes.append(
            f"The machine was shared and busy during {', '.join(busy)} (other processes used up to "
            f"{env['other_processes_cpu_cores_max']:.1f} of {os.cpu_count()} CPUs, measured from /proc/stat "
            "minus this process): absolute speeds are far below an idle machine's and the full/raw ratios "
            "are not representative (decoding then fills CPU time the contended forward pass loses)."
        )
    if device.type != "cuda":
        notes.append("No GPU was available for this run: the GPU rows (ViT-B-32 bf16) were not measured.")
    table = "\n".join(lines + notes)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extract_speed.md").write_text("# Extraction speed\n\n" + table + "\n")
    (RESULTS / "extract_speed.json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
