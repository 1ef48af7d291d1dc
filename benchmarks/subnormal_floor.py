"""What the floor on label probabilities buys: the same fits with and without it, in one run.

Confident classifiers give wrong-class probabilities that underflow to subnormal floats, whose arithmetic is
many times slower on x86 CPUs. ``luab_sk.nn.label_loss`` (every head) and the convex probe's loss
(``luab_sk.nn.solvers.LinearProbeLoss``) use ``max(p, exp(-60))`` in the gradient instead (the loss value is
exact). This script times, on 1 thread, median of ``--repeats``:

* the forward and backward pass of ``label_loss`` on 6000 x 200 confident logits (6% subnormal
  probabilities when exact);
* ``fit_linear_probe`` and ``LUABClassifier(head="mlp")`` on ``make_embedding_classification``
  6000 x 128, 200 classes;

each with the floor (``_LOG_FLOOR = 60``) and without it (the peer: ``_LOG_FLOOR = inf``, exact
probabilities), and reports the ratio.

Usage::

    python benchmarks/subnormal_floor.py            # 1 thread, median of 3

Writes ``benchmarks/results/subnormal_floor.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402

import luab_sk.nn.losses as losses  # noqa: E402
import luab_sk.nn.solvers as solvers  # noqa: E402
from luab_sk import LUABClassifier  # noqa: E402
from luab_sk.datasets import make_embedding_classification  # noqa: E402


def set_floor(value):
    losses._LOG_FLOOR = value
    solvers._LOG_FLOOR = value


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    X, y, Z = make_embedding_classification(6000, 128, n_classes=200, random_state=0)
    x = torch.from_numpy(((X - X.mean(0)) / X.std(0)).astype(np.float32))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6000, 200, generator=g) * 60.0
    target = torch.randint(0, 200, (6000,), generator=g)
    subnormal = torch.softmax(logits, 1)
    share = float(((subnormal > 0) & (subnormal < torch.finfo(torch.float32).tiny)).float().mean())

    def loss_pass():
        z = logits.clone().requires_grad_()
        losses.label_loss(z, target, "multiclass").backward()

    def probe_fit():
        return solvers.fit_linear_probe(x, torch.from_numpy(y), n_outputs=200, alpha=1e-4)

    def mlp_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LUABClassifier(head="mlp", random_state=0).fit(X, y, Z=Z)

    cases = [
        ("label_loss forward + backward, 6000 x 200 logits", loss_pass, lambda out: ""),
        ("fit_linear_probe, 6000 x 128, 200 classes", probe_fit, lambda out: f"{out.n_iter} iterations"),
        ("LUABClassifier(head='mlp') fit, 6000 x 128, 200 classes", mlp_fit, lambda out: f"{out.n_iter_} it"),
    ]
    rows = []
    with threadpool_limits(limits=1):
        torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # the one-time torch._dynamo import
        loss_pass()
        for name, fn, detail in cases:
            row = {"case": name}
            for label, floor in (("exact", math.inf), ("floor", 60.0)):
                set_floor(floor)
                seconds, out = median_time(fn, args.repeats)
                row[label] = {"s": seconds, "detail": detail(out)}
            set_floor(60.0)
            row["ratio"] = row["floor"]["s"] / row["exact"]["s"]
            rows.append(row)
            print(row, flush=True)

    def cell(r):
        return f"{r['s'] * 1000:.1f} ms" + (f", {r['detail']}" if r["detail"] else "")

    lines = [f"| {r['case']} | {cell(r['exact'])} | {cell(r['floor'])} | {r['ratio']:.2f}x |" for r in rows]
    text = (
        "# The floor on label probabilities: the same work with and without it\n\n"
        f"`python benchmarks/subnormal_floor.py --repeats {args.repeats}`: 1 thread, "
        f"median of {args.repeats}; "
        f"the logits' exact probabilities are {share:.1%} subnormal; load average {load_start:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores). 'exact': `_LOG_FLOOR = inf` "
        "(the peer); 'floor': `_LOG_FLOOR = 60` (the default).\n\n"
        "| case | exact probabilities | floor exp(-60) | floor / exact |\n|---|---|---|---:|\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    write_results("subnormal_floor", text, rows)


if __name__ == "__main__":
    main()
