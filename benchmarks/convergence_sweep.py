"""Does the default linear probe converge? ``LUABClassifier(head="linear")`` on random probe problems.

The other probe benchmarks time a few chosen problems; this one draws many: from the grid of
60 / 300 / 2000 samples x 16 / 128 / 700 features x 2 / 5 / 30 classes x alpha 1e-5 / 1e-3 / 0.1 x
byproduct weight 0 / 1 / 10 x smooth-L1 / L2 byproduct loss, each seed keeps a random quarter of the cells
(``--fraction``), and each kept cell gets ``make_embedding_classification`` data with its own seed, in 30%
of the cells with columns rescaled by random factors in [0.01, 100], in 20% with a quarter of the columns
duplicated (a singular covariance), in 30% with random sample weights in [0.1, 3]. Every probe is fitted
with the estimator's defaults otherwise (``tol=1e-4``, ``max_iter=200``, convex solver, 1 thread) and
counted as unconverged when it raises scikit-learn's ``ConvergenceWarning``.

It prints and writes a table per (alpha, byproduct weight): probes, how many stopped at ``max_iter``,
median and largest iteration counts, total fit time; then each unconverged probe with what reproduces it.

Usage::

    python benchmarks/convergence_sweep.py                 # seeds 1-4, about 500 probes, 1 minute
    python benchmarks/convergence_sweep.py --seeds 5 6 --tag held_out

Writes ``benchmarks/results/convergence_sweep.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402

from luab_sk import LUABClassifier  # noqa: E402
from luab_sk.datasets import make_embedding_classification  # noqa: E402

GRID = {
    "n": (60, 300, 2000),
    "d": (16, 128, 700),
    "k": (2, 5, 30),
    "alpha": (1e-5, 1e-3, 1e-1),
    "byproduct_weight": (0.0, 1.0, 10.0),
    "byproduct_loss": ("smooth_l1", "l2"),
}


def draw_probes(seed: int, fraction: float) -> list[dict]:
    """The probes of one seed: a random ``fraction`` of the grid's cells, each with its data recipe."""
    rng = np.random.default_rng(seed)
    probes = []
    for cell in itertools.product(*GRID.values()):
        if rng.random() > fraction:
            continue
        probe = dict(zip(GRID, cell))
        probe.update(
            data_seed=int(rng.integers(1_000_000)),
            rescaled=bool(rng.random() < 0.3),
            duplicated=bool(rng.random() < 0.2),
            weighted=bool(rng.random() < 0.3),
        )
        probes.append(probe)
    return probes


def make_data(probe: dict):
    """X, y, Z and sample weights (or None) of one probe."""
    rng = np.random.default_rng(probe["data_seed"])
    n, d = probe["n"], probe["d"]
    X, y, Z = make_embedding_classification(n, d, n_classes=probe["k"], random_state=probe["data_seed"])[:3]
    if probe["rescaled"]:
        X = X * rng.uniform(0.01, 100, size=d).astype(np.float32)
    if probe["duplicated"]:
        X[:, : d // 4] = X[:, d // 4 : d // 2]
    weights = rng.uniform(0.1, 3, size=n) if probe["weighted"] else None
    return X, y, Z, weights


def fit_probe(probe: dict, max_iter: int | None) -> dict:
    """Fit the default linear probe; its iterations, seconds and whether it converged."""
    X, y, Z, weights = make_data(probe)
    limit = {} if max_iter is None else {"max_iter": max_iter}
    clf = LUABClassifier(
        head="linear",
        alpha=probe["alpha"],
        byproduct_weight=probe["byproduct_weight"],
        byproduct_loss=probe["byproduct_loss"],
        random_state=0,
        **limit,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        clf.fit(X, y, Z=Z, sample_weight=weights)
        seconds = time.perf_counter() - start
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {**probe, "n_iter": int(clf.n_iter_), "seconds": seconds, "converged": converged}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the grid's cells per seed")
    parser.add_argument("--max-iter", type=int, default=None, help="default: the estimator's (200)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1].")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows = []
    with threadpool_limits(limits=args.threads):
        for seed in args.seeds:
            for probe in draw_probes(seed, args.fraction):
                row = fit_probe(probe, args.max_iter)
                rows.append({"seed": seed, **row})
                if not row["converged"]:
                    print("max_iter:", json.dumps(rows[-1]), flush=True)

    table = []
    for alpha, weight in itertools.product(GRID["alpha"], GRID["byproduct_weight"]):
        group = [r for r in rows if r["alpha"] == alpha and r["byproduct_weight"] == weight]
        if not group:
            continue
        iters = np.array([r["n_iter"] for r in group])
        stopped = sum(not r["converged"] for r in group)
        seconds = sum(r["seconds"] for r in group)
        table.append(
            f"| {alpha:g} | {weight:g} | {len(group)} | {stopped} | {int(np.median(iters))} | {iters.max()} "
            f"| {seconds:.2f} |"
        )
    stopped = [r for r in rows if not r["converged"]]
    keys = ("seed", *GRID, "data_seed", "rescaled", "duplicated", "weighted", "n_iter")
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/convergence_sweep.py", *given])
    text = (
        "# Convergence of the default linear probe on random problems\n\n"
        f"`{command}`: {len(rows)} probes (seeds {', '.join(map(str, args.seeds))}), "
        f'`LUABClassifier(head="linear")` defaults (tol=1e-4, max_iter={args.max_iter or 200}), '
        f"{args.threads} thread(s); load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end ({os.cpu_count()} cores). In all: {len(stopped)} stopped at max_iter, "
        f"{sum(r['n_iter'] for r in rows)} iterations, "
        f"{sum(r['seconds'] for r in rows):.1f} s of fitting.\n\n"
        "| alpha | byproduct weight | probes | stopped at max_iter | median iterations | most iterations "
        "| fit time (s, total) |\n|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(table) + "\n\n"
        "Probes that stopped at max_iter:\n\n"
        + (
            "\n".join("- " + ", ".join(f"{key}={r[key]}" for key in keys) for r in stopped)
            if stopped
            else "- none"
        )
        + "\n"
    )
    print(text)
    write_results("convergence_sweep", text, rows, args.tag)


if __name__ == "__main__":
    main()
