"""Does ``fit_linear_probe(whiten=None)`` pick the faster preconditioning? A grid of probe problems.

For each problem (``make_embedding_classification`` at several shapes and class counts, scikit-learn's
``make_classification`` made ill-conditioned, and, when the cached EfficientNet-Lite0 features of
``benchmarks/probe_speed.py`` exist, those) the convex solver runs on standardised float32 features
with every whitening choice:

* without Z: ``whiten=False`` (no row whitened) and ``whiten=True`` (every row);
* with Z (``byproduct_weight=1``): ``whiten="byproducts"`` (the byproduct rows only) and ``whiten=True``;

and ``whiten=None``, the default. The table gives iterations, median fit time (covariance included),
the objective reached, the rule's inputs (the covariance's cost in gradient evaluations and the
participation ratio over ``d``) and its choice. The verdict per row: *right* when the default is within
15% of the time of the fastest choice that reaches the best objective (to ``1e-3``, relative), and at that
objective itself; otherwise how it falls short.

Usage::

    python benchmarks/whitening_rule.py            # 1 thread, median of 3
    python benchmarks/whitening_rule.py --repeats 5

Writes ``benchmarks/results/whitening_rule.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402
from probe_speed import CACHE, real_features, sklearn_features  # noqa: E402

from luab_sk.datasets import make_embedding_classification  # noqa: E402
from luab_sk.nn.solvers import (  # noqa: E402
    _WHITEN_EVALS,
    _WHITEN_SPREAD,
    LinearProbeLoss,
    _participation_ratio,
    _whitened_rows,
    fit_linear_probe,
)


def problems(include_real):
    for n, d, k in [(3000, 256, 10), (4000, 384, 20), (2000, 512, 5), (5000, 768, 50), (10000, 128, 200)]:
        X, y, Z = make_embedding_classification(n, d, n_classes=k, random_state=1)
        yield f"make_embedding_classification {n} x {d}, {k} classes", X, y, Z
    X, y, Z = sklearn_features(10000, 512, 100)
    yield "make_classification (ill-conditioned) 10000 x 512, 100 classes", X, y, Z
    if include_real:
        X, y, Z, _ = real_features(3000, verbose=0)
        yield "EfficientNet-Lite0 scenes 2000 x 1280, 3 classes", X[:2000], y[:2000], Z[:2000]


def measure(x, y, z, weight, choices, repeats):
    """Median time and last fit per choice; the choices take turns in each repeat (load drift hits all)."""
    times, fits = {label: [] for label in choices}, {}
    for _ in range(repeats):
        for label, whiten in choices.items():
            start = time.perf_counter()
            fits[label] = fit_linear_probe(
                x, y, z, n_outputs=int(y.max()) + 1, byproduct_weight=weight, whiten=whiten
            )
            times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(times[label]), fits[label]) for label in choices}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-real", action="store_true", help="skip the EfficientNet-Lite0 features")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    include_real = not args.skip_real and CACHE.exists()
    rows, load_start = [], os.getloadavg()
    with threadpool_limits(limits=args.threads):
        for name, X, y, Z in problems(include_real):
            X = (X - X.mean(0)) / np.maximum(X.std(0), 1e-12)
            Z = (Z - np.nanmean(Z, 0)) / np.nanstd(Z, 0)
            x, yt = torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y)
            z = torch.from_numpy(Z.astype(np.float32))
            for weight in (0.0, 1.0):
                loss = LinearProbeLoss(x, yt, z, n_outputs=int(y.max()) + 1, byproduct_weight=weight)
                n, d = x.shape
                cost = (n * d * d + d**3 / 3) / (2.0 * n * d * loss.n_rows)
                start = _whitened_rows(loss, None)
                choice = {0: "every row", None: "none"}.get(start, "byproduct rows")
                choices = (
                    {"none": False, "every row": True}
                    if weight == 0
                    else {"byproduct rows": "byproducts", "every row": True}
                )
                results = measure(x, yt, z, weight, {**choices, "default": None}, args.repeats)
                best = min(fit.objective for _, fit in results.values())
                good = [
                    t
                    for k, (t, fit) in results.items()
                    if k != "default" and fit.objective <= best + 1e-3 * abs(best)
                ]
                default_s, default_fit = results["default"]
                excess = (default_fit.objective - best) / abs(best)
                if excess > 1e-3:
                    verdict = (
                        f"objective +{100 * excess:.1f}% over the best choice, "
                        f"{default_s / min(good):.2f}x its time"
                    )
                elif default_s > 1.15 * min(good):
                    verdict = f"slower: {default_s / min(good):.2f}x the fastest choice at the best objective"
                else:
                    verdict = "right"
                rows.append(
                    {
                        "problem": name,
                        "byproduct_weight": weight,
                        "cost_evals": cost,
                        "participation_over_d": _participation_ratio(loss) / d,
                        "choice": choice,
                        "fits": {
                            k: {
                                "s": t,
                                "n_iter": fit.n_iter,
                                "objective": fit.objective,
                                "converged": fit.converged,
                            }
                            for k, (t, fit) in results.items()
                        },
                        "verdict": verdict,
                    }
                )
                print(rows[-1], flush=True)

    def cell(fits, key):
        if key not in fits:
            return "-"
        f = fits[key]
        return f"{f['n_iter']}{'' if f['converged'] else ' (max_iter)'}, {f['s']:.3f} s, {f['objective']:.5f}"

    lines = [
        f"| {r['problem']} | {r['byproduct_weight']:g} | {r['cost_evals']:.1f} "
        f"| {r['participation_over_d']:.3f} "
        f"| {r['choice']} | {cell(r['fits'], 'none')} | {cell(r['fits'], 'byproduct rows')} "
        f"| {cell(r['fits'], 'every row')} "
        f"| {cell(r['fits'], 'default')} | {r['verdict']} |"
        for r in rows
    ]
    right = sum(r["verdict"] == "right" for r in rows)
    text = (
        "# The whitening rule of the convex probe solver\n\n"
        f"`python benchmarks/whitening_rule.py --repeats {args.repeats} --threads {args.threads}`: "
        "`fit_linear_probe` on standardised float32 features, alpha=1e-4, tol=1e-4, "
        f"median of {args.repeats}; "
        f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({os.cpu_count()} cores). Rule (`whiten=None`): byproduct rows whenever n >= d; label rows when "
        "the "
        f"covariance costs at most {_WHITEN_EVALS:g} gradient evaluations and the participation ratio is at "
        f"most {_WHITEN_SPREAD:g} d. Cells: iterations, seconds (covariance included), objective. "
        "Verdict: 'right' when the default reaches the best objective any choice reached (to 1e-3, "
        "relative) within 15% of the time of the fastest choice that does; otherwise how it falls short. "
        "At tol=1e-4 "
        "no choice reaches the optimum exactly, so the objectives differ between choices.\n\n"
        "| problem | weight | covariance (evals) | participation / d | rule's choice | whiten=False "
        "| whiten='byproducts' | whiten=True | default | verdict |\n"
        "|---|---:|---:|---:|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + f"\n\nThe rule chose right in {right} of {len(rows)} rows.\n"
    )
    print(text)
    write_results("whitening_rule", text, rows)


if __name__ == "__main__":
    main()
