"""Does click supervision help when the backbone is fine-tuned? The spurious-background study, end to end.

On the Waterbirds-style scenes of :func:`luab_sk.datasets.spurious.make_spurious_benchmark` (a real object
photo, which alone decides the label, pasted on a tinted texture that agrees with the label in 95% of the
training scenes and is independent of it at test time; simulated clicks near the object, 14% missing),
``LUABFineTuner`` with the attention head and a heatmap loss is trained three ways:

* no Z (``byproduct_weight=0``), with Z, and with shuffled Z (the clicks of other scenes: a control that
  keeps the loss but breaks the link between click and object);

each both end to end (all backbone layers that feed the head are trained) and as a frozen probe
(``trainable_layers="frozen"``: the same head, data, augmentation and epochs on frozen features), so the
table shows when fine-tuning beats the frozen probe. The backbone is the offline ImageNet-pretrained
EfficientNet-Lite0; the head reads the tokens of an intermediate stage (``--layer``, a finer grid than the
last one). Reported on the balanced test split, medians over seeds: accuracy, worst-group accuracy (groups =
label x background) and the pointing game (the attention map's peak inside the object box).

Usage::

    python benchmarks/finetune_study.py          # quick: 160 training scenes at 112 px, 5 epochs, 2 seeds
    python benchmarks/finetune_study.py --full   # 600 training scenes at 160 px, 10 epochs, 3 seeds

Writes ``benchmarks/results/finetune_study.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from luab_sk.datasets.spurious import make_spurious_benchmark
from luab_sk.estimators.finetune import LUABFineTuner
from luab_sk.metrics import pointing_game, worst_group_accuracy

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("no Z", "Z", "shuffled Z")
MODES = {"frozen probe": "frozen", "fine-tuned": "full"}


def run_seed(seed, args):
    splits = make_spurious_benchmark(
        args.n_train,
        2,  # the validation split is not used
        args.n_test,
        correlation=args.correlation,
        object_scale=tuple(args.object_scale),
        image_size=args.image_size,
        random_state=seed,
    )
    train, test = splits["train"], splits["test"]
    shuffled = np.random.default_rng(seed).permutation(train.Z)
    results = {}
    for mode, layers in MODES.items():
        for variant in VARIANTS:
            Z = {"no Z": None, "Z": train.Z, "shuffled Z": shuffled}[variant]
            ft = LUABFineTuner(
                layer=args.layer,
                head="attention",
                byproduct_target="heatmap",
                byproduct_weight=args.byproduct_weight,
                trainable_layers=layers,
                image_size=args.image_size,
                max_iter=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                random_state=seed,
            )
            start = time.perf_counter()
            ft.fit(train.images, train.y, Z=Z)
            fit_s = time.perf_counter() - start
            pred = ft.predict(test.images)
            maps = ft.attention_maps(test.images)
            results[(mode, variant)] = {
                "accuracy": float(np.mean(pred == test.y)),
                "worst_group_accuracy": float(worst_group_accuracy(test.y, pred, test.group)),
                "pointing_game": float(pointing_game(maps, test.boxes)),
                "fit_s": fit_s,
            }
            r = results[(mode, variant)]
            print(
                f"seed {seed} {mode:12s} {variant:10s} acc {r['accuracy']:.3f} "
                f"worst {r['worst_group_accuracy']:.3f} pointing {r['pointing_game']:.3f} ({fit_s:.0f} s)",
                flush=True,
            )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="600 scenes at 160 px, 10 epochs, 3 seeds")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--correlation", type=float, default=0.95, help="training background agreement")
    parser.add_argument(
        "--object-scale", type=float, nargs=2, default=(0.3, 0.45), help="object side / image side range"
    )
    parser.add_argument("--layer", type=int, default=3, help="backbone stage feeding the attention head")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--byproduct-weight", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    full = dict(n_train=600, n_test=400, image_size=160, epochs=10, seeds=3)
    quick = dict(n_train=160, n_test=200, image_size=112, epochs=5, seeds=2)
    for key, value in (full if args.full else quick).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)

    per_seed = [run_seed(seed, args) for seed in range(args.seeds)]
    metrics = ("accuracy", "worst_group_accuracy", "pointing_game", "fit_s")
    rows = []
    for mode in MODES:
        for variant in VARIANTS:
            values = {m: [r[(mode, variant)][m] for r in per_seed] for m in metrics}
            rows.append(
                {
                    "mode": mode,
                    "Z": variant,
                    **{m: statistics.median(v) for m, v in values.items()},
                    "per_seed": values,
                }
            )
    lines = [
        "# LUABFineTuner on spurious backgrounds: no Z vs Z vs shuffled Z, frozen probe vs fine-tuned",
        "",
        f"EfficientNet-Lite0 (ImageNet, offline weights), attention head on stage {args.layer}, heatmap "
        f"loss, byproduct_weight={args.byproduct_weight}; {args.n_train} training scenes "
        f"({100 * args.correlation:.0f}% background-label agreement, objects "
        f"{args.object_scale[0]}-{args.object_scale[1]} of the image side), {args.n_test} balanced test "
        f"scenes, {args.image_size} px, "
        f"{args.epochs} epochs, batch {args.batch_size}, lr {args.learning_rate}; CPU, {args.threads} "
        f"thread(s). Medians over {args.seeds} seeds (per-seed values in the json).",
        "",
        "| backbone training | Z | accuracy | worst-group accuracy | pointing game | fit (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['Z']} | {r['accuracy']:.3f} | {r['worst_group_accuracy']:.3f} | "
            f"{r['pointing_game']:.3f} | {r['fit_s']:.0f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"finetune_study{args.tag}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
