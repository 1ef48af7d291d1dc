"""The ``luab`` command: ``study`` (the main job), ``demo``, ``extract`` and ``fit``.

Run ``luab --help`` (or ``python -m luab_sk.cli --help``) for the options of each subcommand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _demo(args) -> int:
    """Synthetic embeddings with informative byproducts: accuracy without Z, with Z, with shuffled Z."""
    from sklearn.model_selection import train_test_split

    from luab_sk.datasets.synthetic import make_embedding_classification
    from luab_sk.estimators.classifier import LUABClassifier

    rows = {"no Z (byproduct_weight=0)": [], "LUAB with Z": [], "LUAB with shuffled Z (control)": []}
    for seed in range(args.seeds):
        X, y, Z = make_embedding_classification(
            args.n_samples, 256, n_classes=10, signal_strength=0.2, random_state=seed
        )
        X_tr, X_te, y_tr, y_te, Z_tr, _ = train_test_split(
            X, y, Z, train_size=args.train_size, stratify=y, random_state=seed
        )
        shuffled = np.random.default_rng(seed).permutation(Z_tr)
        for name, weight, z in (
            ("no Z (byproduct_weight=0)", 0.0, None),
            ("LUAB with Z", args.byproduct_weight, Z_tr),
            ("LUAB with shuffled Z (control)", args.byproduct_weight, shuffled),
        ):
            clf = LUABClassifier(
                head="linear", hidden_size=8, byproduct_weight=weight, max_iter=300, random_state=seed
            )
            rows[name].append(clf.fit(X_tr, y_tr, Z=z).score(X_te, y_te))
    print(
        f"Synthetic CLIP-like embeddings, {args.train_size} labelled training samples, 10 classes, "
        f"{args.seeds} seeds (test accuracy, mean +- std):"
    )
    for name, scores in rows.items():
        print(f"  {name:<34} {np.mean(scores):.3f} +- {np.std(scores):.3f}")
    return 0


def _study(args) -> int:
    from luab_sk.study import PRESETS, run_study

    preset = {**PRESETS["quick" if args.quick else "default"], "seeds": tuple(range(args.seeds))}
    run_study(**preset, cache_dir=args.cache_dir, output_dir=args.out, verbose=1)
    return 0


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _read_images(paths: list[str]) -> list[str]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in _IMAGE_SUFFIXES)
        elif p.exists():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"image path {str(p)!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images found under {paths}")
    return files


def _extract(args) -> int:
    from luab_sk.features import FeatureExtractor

    files = _read_images(args.images)
    fe = FeatureExtractor(
        backbone=args.backbone,
        pretrained=None if args.pretrained.lower() == "none" else args.pretrained,
        output=args.output,
        layer=args.layer,
        token_dim=args.token_dim,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        on_error="skip",
        verbose=1,
    )
    features = fe.fit_transform(files)
    arrays = features if isinstance(features, dict) else {args.output: features}
    np.savez(args.out, paths=np.array(files), **{k: np.asarray(v) for k, v in arrays.items()})
    shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items())
    print(f"wrote {shapes} for {len(files)} images to {args.out}")
    for position, item, message in fe.failed_:
        print(f"skipped image {position} ({item}): {message}", file=sys.stderr)
    return 0


def _fit(args) -> int:
    import joblib
    from sklearn.model_selection import cross_val_score

    from luab_sk.estimators.classifier import LUABClassifier

    X = np.load(args.X)
    y = np.load(args.y, allow_pickle=False)
    Z = None if args.Z is None else np.load(args.Z)
    clf = LUABClassifier(
        head=args.head, byproduct_weight=args.byproduct_weight, random_state=args.random_state
    )
    if args.cv:
        scores = cross_val_score(clf, X, y, cv=args.cv, params=None if Z is None else {"Z": Z})
        print(f"{args.cv}-fold accuracy: {scores.mean():.4f} +- {scores.std():.4f}")
    clf.fit(X, y, Z=Z)
    joblib.dump(clf, args.out)
    print(f"saved the fitted LUABClassifier to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``luab`` command."""
    from luab_sk.features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED

    parser = argparse.ArgumentParser(prog="luab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("study", help="the LUAB study on the spurious-correlation benchmark (the main job)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the table and plots")
    p.add_argument("--cache-dir", default=".cache/luab", help="embedding cache (images are encoded once)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a small, fast configuration (smoke test)")
    p.set_defaults(func=_study)

    p = sub.add_parser("demo", help="synthetic embeddings: accuracy with and without byproducts")
    p.add_argument("--n-samples", type=int, default=2500)
    p.add_argument("--train-size", type=int, default=500)
    p.add_argument("--byproduct-weight", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=5)
    p.set_defaults(func=_demo)

    p = sub.add_parser("extract", help="encode images (files or folders) into an .npz of features")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument(
        "--pretrained", default=DEFAULT_PRETRAINED, help="tag, checkpoint path, or 'none' (random init)"
    )
    p.add_argument("--output", choices=["pooled", "tokens", "both"], default="pooled")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--token-dim", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.set_defaults(func=_extract)

    p = sub.add_parser("fit", help="fit a LUABClassifier on .npy features, labels and byproducts")
    p.add_argument("--X", required=True, help=".npy features (n, d) or tokens (n, L, C)")
    p.add_argument("--y", required=True, help=".npy labels (n,)")
    p.add_argument("--Z", default=None, help=".npy byproducts (n, k), NaN for missing")
    p.add_argument("--head", default="mlp", choices=["linear", "mlp", "attention"])
    p.add_argument("--byproduct-weight", type=float, default=1.0)
    p.add_argument("--cv", type=int, default=0, help="also report k-fold cross-validated accuracy")
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument("--out", required=True, help="output .joblib")
    p.set_defaults(func=_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``luab`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
