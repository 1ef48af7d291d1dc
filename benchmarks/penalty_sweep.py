"""Linear-probe fit time across the penalty strength: the convex solver against LogisticRegression.

A grid search over ``alpha`` reaches strong penalties, where the nuclear-norm probe's optimum is low rank
and L-BFGS on ``M`` is slow (the smoothed nuclear norm is stiff there; ``luab_sk.nn.solvers`` tries
L-BFGS on balanced factors after 100 iterations). For each ``alpha`` and each problem
(``make_embedding_classification``, standardised float32 features) this times ``fit_linear_probe``
(the solver ``LUABClassifier(head="linear")`` runs) without Z and with Z (``byproduct_weight=1``), and
``LogisticRegression(lbfgs)`` at the matched ``C = 1 / (alpha * n)`` on the same features: median time,
iterations, whether each converged at the default ``max_iter`` (200 for ours, 100 for scikit-learn's),
test accuracy, and the ratios ours / LogisticRegression and with Z / without.

Usage::

    python benchmarks/penalty_sweep.py             # 1 thread, median of 3
    python benchmarks/penalty_sweep.py --problem 10000,512,100 --alphas 1e-2 --max-iter 500 --tag 10k_512_100

Writes ``benchmarks/results/penalty_sweep.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402
from probe_speed import timed  # noqa: E402

from luab_sk.datasets import make_embedding_classification  # noqa: E402
from luab_sk.nn.solvers import fit_linear_probe  # noqa: E402

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1)
PROBLEMS = ((1500, 128, 10), (4000, 384, 20))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--problem", action="append", help="n_train,n_features,n_classes (repeatable; default: two small)"
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--max-iter", type=int, default=None, help="ours (default: the solver's, 200)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    problems = [tuple(int(v) for v in p.split(",")) for p in args.problem] if args.problem else PROBLEMS
    limit = {} if args.max_iter is None else {"max_iter": args.max_iter}
    torch.set_num_threads(args.threads)
    rows, load_start = [], os.getloadavg()
    # the first torch optimiser of a process imports torch._dynamo (seconds): keep it out of the timings
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])
    with threadpool_limits(limits=args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for n, d, k in problems:
            X, y, Z = make_embedding_classification(n + n // 4, d, n_classes=k, random_state=0)
            X = ((X - X[:n].mean(0)) / X[:n].std(0)).astype(np.float32)
            Z = ((Z - np.nanmean(Z[:n], 0)) / np.nanstd(Z[:n], 0)).astype(np.float32)
            x, yt, z = torch.from_numpy(X[:n]), torch.from_numpy(y[:n]), torch.from_numpy(Z[:n])
            x_test = torch.from_numpy(X[n:])
            for alpha in args.alphas:
                lr_s, lr = timed(
                    partial(LogisticRegression(C=1.0 / (alpha * n)).fit, X[:n], y[:n]), args.repeats
                )
                row = {
                    "problem": f"make_embedding_classification {n} x {d}, {k} classes",
                    "alpha": alpha,
                    "lr": {
                        "s": lr_s,
                        "n_iter": int(lr.n_iter_[0]),
                        "converged": bool(lr.n_iter_[0] < lr.max_iter),
                        "test_accuracy": float(lr.score(X[n:], y[n:])),
                    },
                }
                for weight in (0.0, 1.0):
                    s, fit = timed(
                        partial(
                            fit_linear_probe,
                            x,
                            yt,
                            z,
                            n_outputs=k,
                            alpha=alpha,
                            byproduct_weight=weight,
                            **limit,
                        ),
                        args.repeats,
                    )
                    scores = x_test @ fit.coef[:k].T + fit.intercept[:k]
                    row[f"ours_w{weight:g}"] = {
                        "s": s,
                        "n_iter": fit.n_iter,
                        "converged": fit.converged,
                        "method": fit.method,
                        "test_accuracy": float((scores.argmax(1).numpy() == y[n:]).mean()),
                    }
                rows.append(row)
                print(row, flush=True)

    def cell(r):
        return (
            f"{r['s']:.3f} s, {r['n_iter']}{'' if r['converged'] else ' (max_iter)'}, "
            f"{r['test_accuracy']:.3f}"
        )

    lines = [
        f"| {r['problem']} | {r['alpha']:g} | {cell(r['lr'])} | {cell(r['ours_w0'])} "
        f"({r['ours_w0']['method']}) | {cell(r['ours_w1'])} ({r['ours_w1']['method']}) "
        f"| {r['ours_w0']['s'] / r['lr']['s']:.2f}x | {r['ours_w1']['s'] / r['ours_w0']['s']:.2f}x |"
        for r in rows
    ]
    command = " ".join(["python benchmarks/penalty_sweep.py", *(argv if argv is not None else sys.argv[1:])])
    ours_max = args.max_iter or 200
    text = (
        "# Linear-probe fit time across the penalty strength\n\n"
        f"`{command}`: "
        f"standardised float32 features (80% train, 20% test), tol=1e-4, max_iter: ours {ours_max}, "
        f"LogisticRegression 100; median of {args.repeats}; load average {load_start[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores). Cells: time, iterations, test "
        "accuracy. Ours: `fit_linear_probe` (nuclear norm alpha ||M||_*); LogisticRegression: "
        "C = 1 / (alpha n) (ridge alpha / 2 ||W||^2), so the models differ and so do their accuracies.\n\n"
        "| problem | alpha | LogisticRegression | ours, no Z | ours, Z (weight 1) | ours no Z / LR "
        "| Z / no Z |\n|---|---:|---|---|---|---:|---:|\n" + "\n".join(lines) + "\n"
    )
    print(text)
    write_results("penalty_sweep", text, rows, args.tag)


if __name__ == "__main__":
    main()
