"""JPEG decode + eval resize throughput: the CPU (PIL) path against the tensor path (torchvision decode_jpeg).

Decoding alone is timed (no backbone): images/s of

* ``cpu-pil``: what the extractor's decode thread does per image on one core: PIL decode (JPEG draft
  scaling down to the resize size), the backbone's eval resize and centre crop, numpy stacking;
* ``tensor-cpu``: :class:`luab_sk.features.gpu_decode.TensorDecodeLoader` on the CPU with one torch
  thread (libjpeg-turbo ``decode_jpeg`` on the batch at full size, torch antialiased resizes on tensors):
  the GPU pipeline's code path, not a path the extractor takes on a CPU;
* ``tensor-cuda`` (with a GPU): the same on CUDA (nvJPEG batched decode, resize on the GPU).

With a GPU it also times ``FeatureExtractor.transform`` end to end (bf16, ViT-B-32 random init and the
default backbone) with ``decode_device="cpu"`` and ``"cuda"``. Every path's pixels are run through the
backbone (the default: EfficientNet-Lite0 with its ImageNet weights) and compared with the PIL path's
features (cosine similarity). It prints the device name and writes
``benchmarks/results/gpu_decode.{md,json}``.

Usage::

    python benchmarks/gpu_decode.py                 # 64 images, 3 repeats
    python benchmarks/gpu_decode.py --n 512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from extract_speed import make_photos  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from luab_sk.features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, FeatureExtractor, load_backbone  # noqa: E402
from luab_sk.features.gpu_decode import TensorDecodeLoader, probe_decode  # noqa: E402
from luab_sk.features.images import ImageDataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_dataset(backbone, paths):
    resize, min_size = backbone.eval_resize()
    return ImageDataset(paths, transforms.Compose([resize, np.asarray]), min_size=min_size)


def run_pil(backbone, paths, batch_size):
    dataset = cpu_dataset(backbone, paths)
    out = []
    for start in range(0, len(paths), batch_size):
        out.append(np.stack([dataset[k][0] for k in range(start, min(start + batch_size, len(paths)))]))
    return torch.from_numpy(np.concatenate(out))


def run_tensor(backbone, paths, batch_size, device):
    loader = TensorDecodeLoader(cpu_dataset(backbone, paths), backbone, device, batch_size)
    out = [batch for batch, _ in loader]
    sync(torch.device(device))
    return torch.cat(out), loader


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def features(backbone, pixels, device, batch_size=32):
    model = backbone.eval().to(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = backbone.normalize(pixels[i : i + batch_size].to(device))
            out.append(model(x, outputs=("pooled",))["pooled"].float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def extract_rate(paths, device, decode_device, backbone, pretrained, batch_size):
    fe = FeatureExtractor(
        backbone, pretrained, device=str(device), decode_device=decode_device, batch_size=batch_size
    )
    fe.transform(paths[: batch_size * 2])  # warm-up (cuDNN, nvJPEG handles)
    sync(device)
    t0 = time.perf_counter()
    fe.transform(paths)
    sync(device)
    return len(paths) / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="number of JPEG files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED)
    parser.add_argument("--out", default="gpu_decode", help="results file stem under benchmarks/results")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    gpu = torch.device("cuda") if cuda else None
    cpu = torch.device("cpu")
    env = {
        "device": device_name(gpu or cpu),
        "cpu": device_name(cpu),
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "n_images": args.n,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "load_average": os.getloadavg()[0],
    }
    print(f"Device: {env['device']}", flush=True)
    if cuda:
        env["nvjpeg_probe"] = probe_decode("cuda:0") or "ok"
    backbone = load_backbone(args.backbone, args.pretrained)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.n, long_side=(400, 1000))  # ImageNet-like JPEGs
        sizes = [Image.open(p).size for p in paths]
        env["mean_image_size"] = [
            float(np.mean([s[0] for s in sizes])),
            float(np.mean([s[1] for s in sizes])),
        ]
        seconds, pil = timed(lambda: run_pil(backbone, paths, args.batch_size), args.repeats)
        ref = features(backbone, pil, gpu or cpu)
        rows.append(
            {
                "path": "cpu-pil",
                "images_per_s": args.n / seconds,
                "cosine_min": 1.0,
                "cosine_median": 1.0,
                "max_abs_pixel_diff": 0,
                "mean_abs_pixel_diff": 0.0,
                "fallbacks": {},
            }
        )
        runs = [("tensor-cpu", "cpu")] + (
            [("tensor-cuda", "cuda")] if cuda and env["nvjpeg_probe"] == "ok" else []
        )
        for name, dev in runs:
            # One torch thread on the CPU, like the PIL path (one decode thread): per-image ops this small
            # only lose from intra-op threading (10x slower with 2 threads on a busy 2-core machine).
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if dev == "cpu" else threads)
            try:
                run_tensor(backbone, paths[: args.batch_size], args.batch_size, dev)  # warm-up
                seconds, (pixels, loader) = timed(
                    lambda dev=dev: run_tensor(backbone, paths, args.batch_size, dev), args.repeats
                )
            finally:
                torch.set_num_threads(threads)
            feats = features(backbone, pixels, gpu or cpu)
            cos = cosine(ref, feats)
            diff = (pixels.cpu().to(torch.int16) - pil.to(torch.int16)).abs()
            rows.append(
                {
                    "path": name,
                    "images_per_s": args.n / seconds,
                    "cosine_min": float(cos.min()),
                    "cosine_median": float(np.median(cos)),
                    "max_abs_pixel_diff": int(diff.max()),
                    "mean_abs_pixel_diff": float(diff.float().mean()),
                    "fallbacks": dict(loader.fallbacks_),
                }
            )
        end_to_end = []
        if cuda:
            for bb, pre in [(args.backbone, args.pretrained), ("open_clip:ViT-B-32", None)]:
                for decode in ("cpu", "cuda"):
                    rate = extract_rate(paths, gpu, decode, bb, pre, args.batch_size)
                    end_to_end.append({"backbone": bb, "decode_device": decode, "images_per_s": rate})
    base = rows[0]["images_per_s"]
    lines = [
        f"Device: {env['device']}; CPU: {env['cpu']}; load average at start {env['load_average']:.1f}",
        f"{args.n} JPEGs, mean size {env['mean_image_size'][0]:.0f} x {env['mean_image_size'][1]:.0f} px, "
        f"batch {args.batch_size}, median of {args.repeats}; backbone {args.backbone} ({args.pretrained}).",
        "",
        "| path | images/s (decode + resize) | vs cpu-pil | feature cosine min / median "
        "| pixel diff max / mean | fallbacks |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
            f"{r['cosine_min']:.4f} / {r['cosine_median']:.4f} | {r['max_abs_pixel_diff']} / "
            f"{r['mean_abs_pixel_diff']:.2f} | {r['fallbacks'] or '-'} |"
        )
    if end_to_end:
        lines += ["", "| FeatureExtractor.transform | decode_device | images/s |", "|---|---|---|"]
        lines += [f"| {e['backbone']} | {e['decode_device']} | {e['images_per_s']:.1f} |" for e in end_to_end]
    else:
        lines += [
            "",
            "No GPU here: the tensor-cuda row and the end-to-end GPU numbers are pending a lent GPU.",
        ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("# GPU JPEG decode\n\n" + table + "\n")
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"environment": env, "decode": rows, "end_to_end": end_to_end}, indent=1)
    )


if __name__ == "__main__":
    main()
