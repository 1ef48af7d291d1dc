"""End-to-end training speed of LUABFineTuner: images/s and peak memory, against a plain torch loop.

For every backbone, three configurations run in their own fresh process (so peak memory is theirs alone):

* ``LUABFineTuner`` fine-tuning the whole backbone with the attention head and click supervision (Z),
  images decoded and augmented by its DataLoader (random-resized crop, flip, colour jitter, Z geometry);
* the same with the backbone frozen (``trainable_layers="frozen"``: an attention probe on augmented images);
* the peer: a plain torch loop on the same backbone (pooled embedding -> linear layer, cross-entropy,
  AdamW, the same autocast and memory format) on ready-made tensors already on the device, i.e. the cost
  of the backbone alone with no data pipeline and no byproduct head.

Throughput is the median over ``--repeats`` timed epochs (after one warm-up epoch) of images / epoch time,
in wall time and in CPU time of the process; ratios are ours / plain loop, measured in the same run on the
same machine, on CPU time for CPU runs without DataLoader workers (robust to other jobs on a shared machine:
the run uses one thread) and on wall time otherwise.
Peak memory is the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Usage::

    python benchmarks/finetune_speed.py                  # CPU, EfficientNet-Lite0 at 160 px, batch 16
    python benchmarks/finetune_speed.py --full           # CPU, 224 px, batch 32
    python benchmarks/finetune_speed.py --gpu            # CUDA: open_clip ViT-B-32 and ResNet-50,
                                                         # batch 128, bf16 AMP, channels_last for CNNs

Writes ``benchmarks/results/finetune_speed.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(n, size, seed=0):
    """Random uint8 photos a little larger than the training size, labels and click points."""
    rng = np.random.default_rng(seed)
    side = int(size * 1.15)
    X = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    return X, np.arange(n) % 2, rng.uniform(0.1, 0.9, size=(n, 2)).astype(np.float32)


class _EpochClock:
    """Wall and CPU time of every epoch (CPU time is robust to other jobs on a shared machine)."""

    def __init__(self, device):
        self.device, self.wall, self.cpu = device, [], []

    def __enter__(self):
        _sync(self.device)
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])

    def summary(self, n_images):
        """Medians over the epochs after the first (warm-up) one."""
        wall, cpu = self.wall[1:], self.cpu[1:]
        return {
            "images_per_s": n_images / statistics.median(wall),
            "images_per_cpu_s": n_images / statistics.median(cpu),
            "epoch_s": wall,
            "epoch_cpu_s": cpu,
            "peak_mb": _peak_memory_mb(self.device),
        }


def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_finetuner(cfg):
    """Images/s of LUABFineTuner epochs (run in a child process)."""
    torch.set_num_threads(cfg["threads"])
    from luab_sk._utils import resolve_device
    from luab_sk.estimators.finetune import LUABFineTuner

    device = resolve_device(cfg["device"])

    n = cfg["batch_size"] * cfg["steps"]
    X, y, Z = _images(n, cfg["image_size"])
    ft = LUABFineTuner(
        cfg["backbone"],
        pretrained=None,
        image_size=cfg["image_size"],
        batch_size=cfg["batch_size"],
        max_iter=1 + cfg["repeats"],
        trainable_layers=cfg["trainable_layers"],
        amp=cfg["amp"],
        channels_last=cfg["channels_last"],
        num_workers=cfg["num_workers"],
        device=cfg["device"],
        random_state=0,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ft.fit(X, y, Z=Z)
    # The training engine's Timer hook (CUDA synchronised) times every epoch: a public fitted attribute.
    clock = _EpochClock(device)
    clock.wall, clock.cpu = list(ft.epoch_times_), list(ft.epoch_cpu_times_)
    return clock.summary(n)


def measure_plain(cfg):
    """Images/s of a plain torch loop on the same backbone with ready-made device tensors."""
    torch.set_num_threads(cfg["threads"])
    from luab_sk._utils import resolve_device
    from luab_sk.features.backbones import load_backbone

    device = resolve_device(cfg["device"])
    torch.manual_seed(0)
    backbone = load_backbone(cfg["backbone"], None).to(device)
    head = torch.nn.Linear(backbone.pooled_dim, 2).to(device)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    backbone = backbone.to(memory_format=fmt).train()
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    b, s = cfg["batch_size"], cfg["image_size"]
    batches = [
        (
            torch.randn(b, 3, s, s, device=device).contiguous(memory_format=fmt),
            torch.randint(0, 2, (b,), device=device),
        )
        for _ in range(cfg["steps"])
    ]
    use_amp = cfg["amp"] is True or (cfg["amp"] == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = _EpochClock(device)
    for _ in range(1 + cfg["repeats"]):
        with clock:
            for images, labels in batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = head(backbone(images, outputs=("pooled",))["pooled"])
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
    return clock.summary(b * cfg["steps"])


def isolated(fn, cfg):
    """Run ``fn(cfg)`` in a fresh spawned process, so that its peak memory is its own."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, cfg).result()


def report(backbone, method, result):
    print(
        f"{backbone:28s} {method:38s} {result['images_per_s']:8.1f} img/s {result['images_per_cpu_s']:8.1f} "
        f"img/CPU-s {result['peak_mb']:8.0f} MB"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="CPU: 224 px, batch 32 (default 160 px, 16)")
    parser.add_argument("--gpu", action="store_true", help="CUDA: ViT-B-32 and ResNet-50 at batch 128, AMP")
    parser.add_argument("--backbones", nargs="+", help="override the backbones")
    parser.add_argument("--steps", type=int, default=None, help="batches per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)

    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device; none is available on this machine.")
        device, amp = "cuda", "auto"
        backbones = args.backbones or ["open_clip:ViT-B-32", "timm:resnet50"]
        batch, size, steps, workers = 128, 224, 8, 8
    else:
        device, amp = "cpu", False
        backbones = args.backbones or ["timm:tf_efficientnet_lite0"]
        batch, size, steps, workers = (32, 224, 3, 0) if args.full else (16, 160, 3, 0)
    batch = args.batch_size or batch
    size = args.image_size or size
    steps = args.steps or steps
    workers = workers if args.num_workers is None else args.num_workers

    # On a shared CPU, wall time depends on the other jobs; CPU time (1 thread, no workers) does not.
    rate = "images_per_s" if args.gpu or workers else "images_per_cpu_s"
    rows = []
    for backbone in backbones:
        cnn = not backbone.startswith("open_clip:ViT")
        base = dict(
            backbone=backbone,
            device=device,
            amp=amp,
            channels_last=args.gpu and cnn,
            batch_size=batch,
            image_size=size,
            steps=steps,
            repeats=args.repeats,
            threads=args.threads,
            num_workers=workers,
        )
        plain = isolated(measure_plain, base)
        for name, layers in [
            ("LUABFineTuner, full fine-tuning + Z", "full"),
            ("LUABFineTuner, frozen", "frozen"),
        ]:
            ours = isolated(measure_finetuner, dict(base, trainable_layers=layers))
            rows.append(dict(base, method=name, ratio_vs_plain=ours[rate] / plain[rate], **ours))
            report(backbone, name, ours)
        rows.append(dict(base, method="plain torch loop (peer)", ratio_vs_plain=1.0, **plain))
        report(backbone, "plain torch loop (peer)", plain)

    dev_name = torch.cuda.get_device_name(0) if args.gpu else platform.processor() or platform.machine()
    meta = {
        "device": device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": multiprocessing.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "note": "weights random-init (speed does not depend on them); medians over timed epochs",
    }
    lines = [
        f"# LUABFineTuner training speed ({device}: {dev_name}, torch {torch.__version__}, "
        f"{args.threads} thread(s))",
        "",
        f"Machine: {multiprocessing.cpu_count()} cores shared with other jobs (1-min load average "
        f"{os.getloadavg()[0]:.1f} at the end of the run), so wall-time numbers are noisy; the ratios "
        "compare configurations measured in the same run.",
        "",
        f"Batch {batch}, {size} px, {steps} batches per epoch, median of {args.repeats} epochs after a "
        f"warm-up epoch; AMP {'bf16' if device == 'cuda' else 'off'}; DataLoader workers {workers}.",
        "",
        f"Ratios use {'wall' if rate == 'images_per_s' else 'CPU'} time.",
        "",
        "| backbone | method | images/s (wall) | images per CPU-s | ratio vs plain loop | peak memory (MB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['images_per_s']:.1f} | {r['images_per_cpu_s']:.1f} | "
            f"{r['ratio_vs_plain']:.2f} | {r['peak_mb']:.0f} |"
        )
    if not args.gpu:
        lines += [
            "",
            "GPU (open_clip ViT-B-32 and ResNet-50 at batch 128 with bf16 AMP): not measured, no GPU was "
            "available for this run; `python benchmarks/finetune_speed.py --gpu` measures them.",
        ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"finetune_speed{args.tag}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
