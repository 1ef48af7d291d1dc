"""The LUAB study on the embedded default backbone: does Z buy worst-group accuracy on spurious backgrounds?

Waterbirds-style scenes (faces vs non-faces from scikit-image's ``lfw_subset`` on tinted grass vs brick, or
with ``--backgrounds photos`` on random crops of two real photos, scikit-learn's ``china.jpg`` temple scene
vs its ``flower.jpg``; background-label correlation 0.99 in training, balanced at test) with simulated
ImageNet-AB-like clicks. Features of ImageNet EfficientNet-Lite0 are extracted once and cached; then, for
several seeds: a linear probe on pooled features, an attention probe without Z (the byproduct_weight=0
control), LUAB with Z, LUAB with shuffled Z (control), LUAB with kNN-imputed Z, generalized distillation,
and two references: DFR (last-layer retraining on the group-balanced validation split, which uses group
labels) and an oracle (the linear probe trained on group-balanced training scenes); plus a grid search over
``byproduct_weight``, widened while its top wins.

Usage::

    python benchmarks/luab_study.py            # the default study (the main job): 1200 scenes, 3 seeds
    python benchmarks/luab_study.py --quick    # a smaller run (350 scenes, 2 seeds) for a first look
    python benchmarks/luab_study.py --full     # 2000 scenes, 5 seeds
    python benchmarks/luab_study.py --correlation 0.95   # another training correlation (files *_corr0.95.*)
    python benchmarks/luab_study.py --backgrounds photos --data-seeds 3  # photos, 3 x 3 draws

Writes ``luab_study{,_photos}{,_quick,_full}{,_corr<c>}.md/.json`` and the plots ``*_weights.png`` and
``*_attention.png`` to ``benchmarks/results/`` (replacing them): this script is the only one that writes the
tracked results the README quotes. ``luab study`` (``make demo``) writes to ``./luab_output/`` instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from luab_sk.study import PRESETS, run_study


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="350 scenes, 2 seeds")
    size.add_argument("--full", action="store_true", help="2000 scenes, 5 seeds")
    parser.add_argument("--correlation", type=float, default=None, help="default: run_study's (0.99)")
    parser.add_argument(
        "--backgrounds",
        choices=("textures", "photos"),
        default="textures",
        help="tinted textures (grass vs brick) or real photos (china.jpg vs flower.jpg)",
    )
    parser.add_argument(
        "--data-seeds", type=int, default=1, help="scene draws (data_seed 0..N-1), each with all seeds"
    )
    parser.add_argument(
        "--cache-dir",
        default=os.path.expanduser("~/.cache/luab_sk/study"),
        help="embedding cache (a rerun skips feature extraction)",
    )
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "full" if args.full else "default"
    stem = "luab_study" + ("_photos" if args.backgrounds == "photos" else "")
    stem += "" if name == "default" else f"_{name}"
    if args.correlation is not None:
        stem += f"_corr{args.correlation:g}"
    extra = {} if args.correlation is None else {"correlation": args.correlation}
    if args.data_seeds < 1:
        parser.error("--data-seeds must be at least 1")

    result = run_study(
        **PRESETS[name],
        **extra,
        backgrounds=args.backgrounds,
        data_seeds=tuple(range(args.data_seeds)),
        cache_dir=args.cache_dir,
        output_dir=args.output_dir,
        output_name=stem,
    )
    print(f"total {result.timings['total_s']:.0f} s; wrote {', '.join(result.files)}")


if __name__ == "__main__":
    main()
