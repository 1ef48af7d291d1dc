"""Linear-probe and attention-probe fit speed: LUABClassifier against scikit-learn LogisticRegression.

Measures, on ill-conditioned CLIP-like embeddings from ``make_embedding_classification`` (unit norm,
a dominant shared direction, a decaying nuisance spectrum, the label in weak directions):

* ``LUABClassifier(head="linear", byproduct_weight=0)`` (full-batch L-BFGS, float32) against
  ``make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs"))`` at matched regularisation:
  our objective is the mean loss + ``alpha / 2 * ||W||^2`` on standardised inputs (the estimator
  standardises internally), LogisticRegression's is ``C * sum(loss) + ||W||^2 / 2``, so
  ``C = 1 / (alpha * n_train)``. (Our linear head is a rank-``hidden_size`` factorisation, so its
  penalty acts like a nuclear norm, not LogisticRegression's Frobenius norm.) Fit times are medians over
  ``--repeats`` runs, test accuracies are reported for both, and the ratio is ours / theirs.
* the cost of the byproducts: the same fit with ``byproduct_weight=1`` and Z (ratio against weight 0).
* (not matched) the same head with ``early_stopping=True``, a setting a user would pick.
* the attention head on 2000 x 49 tokens of width 1280 (EfficientNet-Lite0's shape), with the token
  PCA to 64 dimensions, with and without click supervision.

Usage::

    python benchmarks/probe_speed.py                 # quick: 10k x 512, 100 classes, 1 thread
    python benchmarks/probe_speed.py --full          # the issue's size: 50k (+10k test) x 512
    python benchmarks/probe_speed.py --device cuda   # our fits on the GPU (LogisticRegression: CPU)

Writes ``benchmarks/results/probe_speed.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from luab_sk._utils import resolve_device
from luab_sk.datasets.synthetic import make_embedding_classification
from luab_sk.estimators.classifier import LUABClassifier

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeats):
    """Median wall time of ``repeats`` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def spatial_tokens(n, n_tokens, width, seed):
    """Random tokens with one class-carrying object token per sample; Z is its centre."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n_tokens))
    means = rng.normal(size=(5, width)).astype(np.float32)
    y = rng.integers(0, 5, n)
    X = rng.normal(size=(n, n_tokens, width)).astype(np.float32)
    pos = rng.integers(0, n_tokens, n)
    X[np.arange(n), pos] += means[y]
    row, col = np.divmod(pos, side)
    Z = np.stack([(col + 0.5) / side, (row + 0.5) / side], axis=1).astype(np.float32)
    return X, y, Z


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="50k training samples (default 10k)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-features", type=int, default=512)
    parser.add_argument("--n-classes", type=int, default=100)
    parser.add_argument("--hidden-size", type=int, default=128, help="rank of the linear head")
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="device of our fits ('cpu', 'cuda', 'auto')")
    parser.add_argument("--attention-samples", type=int, default=2000)
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    n_train = args.n_train or (50_000 if args.full else 10_000)
    n_test = max(2000, n_train // 5)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    rows = []

    X, y, Z = make_embedding_classification(
        n_train + n_test, args.n_features, n_classes=args.n_classes, random_state=0
    )
    X_train, y_train, Z_train, X_test, y_test = (
        X[:n_train],
        y[:n_train],
        Z[:n_train],
        X[n_train:],
        y[n_train:],
    )
    common = {"head": "linear", "hidden_size": args.hidden_size, "alpha": args.alpha, "random_state": 0}
    C = 1.0 / (args.alpha * n_train)

    with threadpool_limits(limits=args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # Warm-up: the first torch optimiser of a process imports torch._dynamo (seconds); keep it out.
        LUABClassifier(head="linear", max_iter=2, device=args.device).fit(X_train[:50], y_train[:50])
        lr_time, lr = timed(
            lambda: make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(
                X_train, y_train
            ),
            args.repeats,
        )
        lr_acc = lr.score(X_test, y_test)
        rows.append(
            {
                "model": f"LogisticRegression(lbfgs, C={C:.3g}) + StandardScaler",
                "device": "cpu",
                "fit_s": lr_time,
                "n_iter": int(lr[-1].n_iter_[0]),
                "test_accuracy": lr_acc,
                "ratio": 1.0,
                "ratio_to": "LogisticRegression",
            }
        )
        for weight in (0.0, 1.0):
            fit_time, clf = timed(
                lambda w=weight: LUABClassifier(byproduct_weight=w, device=args.device, **common).fit(
                    X_train, y_train, Z=Z_train
                ),
                args.repeats,
            )
            rows.append(
                {
                    "model": f"LUABClassifier(linear, rank {args.hidden_size}, byproduct_weight={weight:g})",
                    "device": str(device),
                    "fit_s": fit_time,
                    "n_iter": clf.n_iter_,
                    "test_accuracy": clf.score(X_test, y_test),
                    "ratio": fit_time / (lr_time if weight == 0 else rows[1]["fit_s"]),
                    "ratio_to": "LogisticRegression" if weight == 0 else "byproduct_weight=0",
                }
            )

        # Not matched regularisation: held-out early stopping (10% of the training data), the setting a
        # user would pick; reported apart from the matched comparison above.
        fit_time, clf = timed(
            lambda: LUABClassifier(
                byproduct_weight=0.0, early_stopping=True, device=args.device, **common
            ).fit(X_train, y_train),
            args.repeats,
        )
        rows.append(
            {
                "model": f"LUABClassifier(linear, rank {args.hidden_size}, byproduct_weight=0, "
                "early_stopping=True)",
                "device": str(device),
                "fit_s": fit_time,
                "n_iter": clf.n_iter_,
                "test_accuracy": clf.score(X_test, y_test),
                "ratio": fit_time / lr_time,
                "ratio_to": "LogisticRegression",
            }
        )

        if not args.skip_attention:
            Xa, ya, Za = spatial_tokens(args.attention_samples, 49, 1280, seed=1)
            for weight in (0.0, 1.0):
                fit_time, clf = timed(
                    lambda w=weight: LUABClassifier(
                        head="attention",
                        hidden_size=64,
                        n_components=64,
                        byproduct_weight=w,
                        device=args.device,
                        random_state=0,
                        max_iter=100,
                    ).fit(Xa, ya, Z=Za),
                    args.repeats,
                )
                rows.append(
                    {
                        "model": f"LUABClassifier(attention, PCA 1280->64, heatmap weight={weight:g}), "
                        f"{args.attention_samples} x 49 x 1280",
                        "device": str(device),
                        "fit_s": fit_time,
                        "n_iter": clf.n_iter_,
                        "test_accuracy": float("nan"),
                        "ratio": float("nan"),
                        "ratio_to": "",
                    }
                )

    meta = {
        "n_train": n_train,
        "n_test": n_test,
        "n_features": args.n_features,
        "n_classes": args.n_classes,
        "alpha": args.alpha,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__},
    }
    header = (
        "| model | device | fit (s, median) | iterations | test accuracy | ratio |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['model']} | {r['device']} | {r['fit_s']:.2f} | {r['n_iter']} | "
        + ("" if np.isnan(r["test_accuracy"]) else f"{r['test_accuracy']:.4f}")
        + " | "
        + ("" if np.isnan(r["ratio"]) else f"{r['ratio']:.2f}x vs {r['ratio_to']}")
        + " |"
        for r in rows
    ]
    text = (
        "# Probe fit speed: LUABClassifier vs LogisticRegression\n\n"
        f"make_embedding_classification: {n_train} train + {n_test} test x {args.n_features} features, "
        f"{args.n_classes} classes; alpha={args.alpha} (LogisticRegression C = 1/(alpha n_train)); "
        f"{args.threads} CPU thread(s); median of {args.repeats} run(s). GPU: {meta['gpu']}.\n\n"
        + header
        + "\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = "probe_speed" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
