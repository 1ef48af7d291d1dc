"""Few-shot linear probes (fewer samples than features): the cost of Z, and LogisticRegression's time.

With ``n < d`` the convex solver cannot whiten the byproduct regression in feature space; with Z it
solves the probe in the row space of ``x`` (``luab_sk.nn.solvers``). For each shape
(``make_embedding_classification``, standardised float32 features) this times ``fit_linear_probe``
without Z and with Z (``byproduct_weight=1``), and ``LogisticRegression(lbfgs)`` at the matched
``C = 1 / (alpha * n)`` (no Z): median time, iterations, convergence at the default ``max_iter``, and the
ratios with Z / without and without Z / LogisticRegression.

Usage::

    python benchmarks/few_shot_probe.py            # 1 thread, median of 5

Writes ``benchmarks/results/few_shot_probe.md`` and ``.json``.
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

SHAPES = ((200, 768, 10), (300, 512, 10), (500, 768, 10), (800, 1024, 5), (1000, 1280, 20), (1200, 1280, 100))
ALPHA = 1e-4


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, load_start = [], os.getloadavg()
    torch.linalg.qr(torch.randn(8, 4))  # first LAPACK call of the process: keep it out of the timings
    with threadpool_limits(limits=args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for n, d, k in SHAPES:
            X, y, Z = make_embedding_classification(n, d, n_classes=k, random_state=0)
            X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
            Z = ((Z - np.nanmean(Z, 0)) / np.nanstd(Z, 0)).astype(np.float32)
            x, yt, z = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(Z)
            row = {"shape": f"{n} x {d}, {k} classes"}
            lr_s, lr = timed(partial(LogisticRegression(C=1.0 / (ALPHA * n)).fit, X, y), args.repeats)
            row["lr"] = {
                "s": lr_s,
                "n_iter": int(lr.n_iter_[0]),
                "converged": bool(lr.n_iter_[0] < lr.max_iter),
            }
            for weight in (0.0, 1.0):
                s, fit = timed(
                    partial(fit_linear_probe, x, yt, z, n_outputs=k, alpha=ALPHA, byproduct_weight=weight),
                    args.repeats,
                )
                row[f"w{weight:g}"] = {"s": s, "n_iter": fit.n_iter, "converged": fit.converged}
            rows.append(row)
            print(row, flush=True)

    def cell(r):
        return f"{r['s']:.3f} s, {r['n_iter']}{'' if r['converged'] else ' (max_iter)'}"

    lines = [
        f"| {r['shape']} | {cell(r['lr'])} | {cell(r['w0'])} | {cell(r['w1'])} "
        f"| {r['w0']['s'] / r['lr']['s']:.2f}x | {r['w1']['s'] / r['w0']['s']:.2f}x |"
        for r in rows
    ]
    text = (
        "# Few-shot linear probes (fewer samples than features)\n\n"
        f"`python benchmarks/few_shot_probe.py --repeats {args.repeats} --threads {args.threads}`: "
        f"make_embedding_classification, standardised float32 features, alpha={ALPHA:g}, tol=1e-4, default "
        f"max_iter; median of {args.repeats}; load average {load_start[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores). Cells: time, iterations. With Z the "
        "solver works in the row space of x (a thin QR of x, included in the time).\n\n"
        "| shape | LogisticRegression (no Z) | ours, no Z | ours, Z (weight 1) | ours no Z / LR "
        "| Z / no Z |\n|---|---|---|---|---:|---:|\n" + "\n".join(lines) + "\n"
    )
    print(text)
    write_results("few_shot_probe", text, rows)


if __name__ == "__main__":
    main()
