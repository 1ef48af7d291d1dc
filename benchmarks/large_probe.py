"""Large linear probes: mini-batch solver streaming a memmap vs LogisticRegression(lbfgs) and SGDClassifier.

ImageNet-AB-sized probes are 1.28M x 768 x 1000 classes. This benchmark writes synthetic CLIP-like
embeddings (``make_embedding_classification``) to ``.npy`` files once, then runs every method in its
own subprocess (so each peak memory figure is that method's alone) on X opened with
``np.load(mmap_mode="r")``:

* ``LogisticRegression(solver="lbfgs")`` after ``StandardScaler`` (both copy X into memory, float64),
  ``C = 1 / (alpha n)``: its test accuracy is the target the others must reach.
* ``SGDClassifier(loss="log_loss", alpha=alpha)`` (one-vs-rest), ``partial_fit`` one epoch at a time on
  the standardised data (in memory), test accuracy after every epoch.
* :func:`luab_sk.nn.solvers.fit_linear_probe_minibatch` (what ``solver="auto"`` would choose at this size:
  mini-batch Adam, warm-up + cosine schedule, contiguous batches read from the memmap, the mean/scale
  computed in one streaming pass, counted in its time), test accuracy after every epoch.
* ``LUABClassifier(head="linear", solver=--luab-solver)`` fitted on the memmap itself (the estimator's
  route: ``solver="auto"`` picks ``"minibatch"`` above 1e8 input elements, full-batch L-BFGS below),
  ``max_iter`` = ``--max-epochs``; one fit, test accuracy at its end (``--luab-early-stopping``: with
  ``early_stopping=True``, 10% of the rows held out, the best epoch by validation loss kept).

Reported per method: time to reach LogisticRegression's test accuracy (training time only; the per-epoch
test evaluations are excluded and reported apart), final accuracy, peak memory three ways: the largest
resident set (``resource.getrusage().ru_maxrss``, which also counts the memmap's file-backed pages that
were read, i.e. reclaimable page cache), the largest *anonymous* resident memory (``RssAnon`` of
``/proc/self/status`` sampled every 20 ms: what the process allocated, the honest "copy" measure), and
``tracemalloc``'s peak of Python/numpy allocations. The baseline (interpreter + torch + sklearn imports)
is recorded too.

Usage::

    python benchmarks/large_probe.py                                   # 200k x 768 x 1000 (slow LR!)
    python benchmarks/large_probe.py --n-train 50000 --n-classes 1000  # a size LR finishes on 2 cores
    python benchmarks/large_probe.py --device cuda                     # the mini-batch solver on a GPU

Writes ``benchmarks/results/large_probe.md`` and ``.json`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
from _results import write_results  # benchmarks/ is on sys.path when run as a script

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "large_probe"


# ------------------------------------------------------------------------------------------ data
def data_paths(args):
    stem = f"n{args.n_train}_t{args.n_test}_d{args.n_features}_c{args.n_classes}_s{args.seed}"
    folder = CACHE / stem
    return folder, {k: folder / f"{k}.npy" for k in ("X", "y", "Z", "X_test", "y_test")}


def make_data(args):
    folder, paths = data_paths(args)
    if all(p.exists() for p in paths.values()):
        return paths, 0.0
    from luab_sk.datasets.synthetic import make_embedding_classification

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    X, y, Z = make_embedding_classification(
        args.n_train + args.n_test, args.n_features, n_classes=args.n_classes, random_state=args.seed
    )
    n = args.n_train
    for key, value in (("X", X[:n]), ("y", y[:n]), ("Z", Z[:n]), ("X_test", X[n:]), ("y_test", y[n:])):
        np.save(paths[key], np.ascontiguousarray(value))
    return paths, time.perf_counter() - start


# ---------------------------------------------------------------------------------------- memory
class MemoryMonitor:
    """Peak anonymous RSS (sampled), ru_maxrss and tracemalloc's peak for one worker process."""

    def __init__(self, interval=0.02):
        self.interval, self.peak_anon, self._stop = interval, 0, threading.Event()
        self.baseline_anon = self._anon()
        self.baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _anon():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        tracemalloc.start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, self._anon())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, self._anon())
        self.tracemalloc_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report(self):
        mb = 2.0**20
        return {
            "peak_rss_mb": self.maxrss / mb,
            "peak_anon_rss_mb": self.peak_anon / mb,
            "anon_rss_over_baseline_mb": (self.peak_anon - self.baseline_anon) / mb,
            "tracemalloc_peak_mb": self.tracemalloc_peak / mb,
            "baseline_anon_rss_mb": self.baseline_anon / mb,
        }


# --------------------------------------------------------------------------------------- workers
def worker(args):
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    # Imports and one-off initialisations before the measurements (the first torch optimiser of a
    # process imports torch._dynamo: seconds, and memory, that are no part of any method).
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from luab_sk._utils import resolve_device
    from luab_sk.estimators._base import streaming_standardization
    from luab_sk.nn.solvers import fit_linear_probe_minibatch

    warm = torch.zeros(1, requires_grad=True)
    warm.grad = torch.zeros(1)
    torch.optim.Adam([warm]).step()
    _, paths = data_paths(args)
    X = np.load(paths["X"], mmap_mode="r")
    y = np.load(paths["y"])
    X_test, y_test = np.load(paths["X_test"]), np.load(paths["y_test"])
    n = X.shape[0]
    alpha = args.alpha
    row = {"method": args.worker, "n_train": n, "n_test": X_test.shape[0]}
    curve = []
    with threadpool_limits(limits=args.threads), MemoryMonitor() as mem:
        if args.worker == "lr":
            start = time.perf_counter()
            pipe = make_pipeline(
                StandardScaler(), LogisticRegression(C=1.0 / (alpha * n), max_iter=args.lr_max_iter)
            )
            pipe.fit(X, y)
            train_s = time.perf_counter() - start
            acc = float(pipe.score(X_test, y_test))
            row.update(
                model=f"LogisticRegression(lbfgs, C={1.0 / (alpha * n):.3g}) + StandardScaler",
                device="cpu",
                train_s=train_s,
                time_to_target_s=train_s,
                eval_s=0.0,
                n_iter=int(pipe[-1].n_iter_[0]),
                test_accuracy=acc,
                reached_target=True,
            )
        elif args.worker == "sgd":
            start = time.perf_counter()
            scaler = StandardScaler().fit(X)
            Xs = scaler.transform(X).astype(np.float32)
            Xt = scaler.transform(X_test).astype(np.float32)
            sgd = SGDClassifier(loss="log_loss", alpha=alpha, n_jobs=args.threads, random_state=0)
            classes = np.arange(args.n_classes)
            train_s, eval_s, reached, acc = time.perf_counter() - start, 0.0, False, float("nan")
            for epoch in range(1, args.max_epochs + 1):
                t0 = time.perf_counter()
                sgd.partial_fit(Xs, y, classes=classes)
                train_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                acc = float(sgd.score(Xt, y_test))
                eval_s += time.perf_counter() - t0
                curve.append({"epoch": epoch, "train_s": train_s, "test_accuracy": acc})
                if acc >= args.target_accuracy:
                    reached = True
                    break
                if train_s > args.budget_s:
                    break
            row.update(
                model=f"SGDClassifier(log_loss, alpha={alpha:g}, OvR) + StandardScaler, partial_fit/epoch",
                device="cpu",
                train_s=train_s,
                time_to_target_s=train_s if reached else None,
                eval_s=eval_s,
                n_iter=len(curve),
                test_accuracy=acc,
                reached_target=reached,
            )
        elif args.worker == "luab":
            from luab_sk.estimators import LUABClassifier

            clf = LUABClassifier(
                head="linear",
                solver=args.luab_solver,
                hidden_size=args.n_classes,  # full rank: no byproducts here
                alpha=alpha,
                max_iter=args.max_epochs,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                device=args.device,
                early_stopping=args.luab_early_stopping,
                n_iter_no_change=2,
                random_state=0,
            )
            solver = clf._resolve_solver(X)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the epoch budget ends the schedule (ConvergenceWarning)
                clf.fit(X, y)
            train_s = time.perf_counter() - start
            acc = float(clf.score(X_test, y_test))
            row.update(
                model=(
                    f"LUABClassifier(head='linear', solver={args.luab_solver!r} -> {solver!r}, "
                    f"max_iter={args.max_epochs}, batch_size={args.batch_size}, "
                    f"learning_rate={args.learning_rate:g}"
                    + (", early_stopping=True, n_iter_no_change=2" if args.luab_early_stopping else "")
                    + f"), memmap X (epochs run: {clf.n_iter_})"
                ),
                device=str(resolve_device(args.device)),
                train_s=train_s,
                time_to_target_s=train_s if acc >= args.target_accuracy else None,
                eval_s=0.0,
                n_iter=int(clf.n_iter_),
                test_accuracy=acc,
                reached_target=acc >= args.target_accuracy,
            )
        else:
            device = resolve_device(args.device)
            row["device_name"] = (
                torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
            )
            print(f"mini-batch solver on {device} ({row['device_name']})", file=sys.stderr)
            start = time.perf_counter()
            # one streaming pass for the standardisation (float64 accumulators)
            mean, scale = streaming_standardization(X, args.batch_size)
            setup_s = time.perf_counter() - start
            xt = torch.as_tensor(((X_test - mean) / scale).astype(np.float32), device=device)
            state = {"train_s": setup_s, "eval_s": 0.0, "t0": time.perf_counter(), "reached": False}

            def callback(epoch, M, b):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                state["train_s"] += now - state["t0"]
                K = args.n_classes
                pred = (xt @ M[:K].T + b[:K]).argmax(1).cpu().numpy()
                acc = float((pred == y_test).mean())
                state["acc"] = acc
                curve.append({"epoch": epoch, "train_s": state["train_s"], "test_accuracy": acc})
                print(f"  epoch {epoch}: {state['train_s']:.1f} s, test accuracy {acc:.4f}", file=sys.stderr)
                done = acc >= args.target_accuracy
                state["reached"] = state["reached"] or done
                state["eval_s"] += time.perf_counter() - now
                state["t0"] = time.perf_counter()
                return done and not args.full_schedule

            fit = fit_linear_probe_minibatch(
                X,
                y,
                mean=mean,
                scale=scale,
                task="multiclass",
                n_outputs=args.n_classes,
                alpha=alpha,
                batch_size=args.batch_size,
                max_epochs=args.max_epochs,
                learning_rate=args.learning_rate,
                device=device,
                callback=callback,
            )
            first = next((c for c in curve if c["test_accuracy"] >= args.target_accuracy), None)
            row.update(
                model=(
                    f"fit_linear_probe_minibatch(Adam, lr={args.learning_rate:g}, batch {args.batch_size}, "
                    f"{args.max_epochs}-epoch cosine, L2 alpha={alpha:g}), memmap X"
                ),
                device=str(device),
                train_s=state["train_s"],
                time_to_target_s=None if first is None else first["train_s"],
                eval_s=state["eval_s"],
                setup_s=setup_s,
                n_iter=fit.n_iter,
                test_accuracy=state.get("acc", float("nan")),
                reached_target=first is not None,
            )
    row.update(mem.report())
    row["curve"] = curve
    row["target_accuracy"] = args.target_accuracy
    print(json.dumps(row))


# ------------------------------------------------------------------------------------------ main
def run_worker(method, args, target):
    cmd = [sys.executable, __file__, "--worker", method, "--target-accuracy", str(target)]
    for key in (
        "n_train",
        "n_test",
        "n_features",
        "n_classes",
        "seed",
        "alpha",
        "threads",
        "batch_size",
        "max_epochs",
        "learning_rate",
        "device",
        "budget_s",
        "lr_max_iter",
        "luab_solver",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for flag in ("full_schedule", "luab_early_stopping"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode != 0:
        raise RuntimeError(f"worker {method} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--n-features", type=int, default=768)
    parser.add_argument("--n-classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--device", default="cpu", help="device of the mini-batch solver ('cpu', 'cuda')")
    parser.add_argument("--budget-s", type=float, default=600.0, help="SGDClassifier training time cap")
    parser.add_argument("--lr-max-iter", type=int, default=1000)
    parser.add_argument("--methods", default="lr,minibatch,luab,sgd")
    parser.add_argument(
        "--luab-solver", default="auto", help="solver of the 'luab' method (LUABClassifier on the memmap)"
    )
    parser.add_argument(
        "--luab-early-stopping",
        action="store_true",
        help="'luab' method: early_stopping=True (10%% validation rows, patience 2 epochs)",
    )
    parser.add_argument("--target-accuracy", type=float, default=None, help="skip LR and use this target")
    parser.add_argument("--full-schedule", action="store_true", help="minibatch: run all epochs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    paths, make_s = make_data(args)
    methods = args.methods.split(",")
    rows = []
    target = args.target_accuracy
    load_start = os.getloadavg()
    if "lr" in methods:
        lr = run_worker("lr", args, -1.0)
        rows.append(lr)
        target = lr["test_accuracy"] if target is None else target
        print(
            f"LogisticRegression: {lr['train_s']:.1f} s, accuracy {lr['test_accuracy']:.4f}", file=sys.stderr
        )
    if target is None:
        raise SystemExit("no target accuracy: run 'lr' or pass --target-accuracy")
    for method in methods:
        if method != "lr":
            rows.append(run_worker(method, args, target))
    lr_time = next((r["train_s"] for r in rows if r["method"] == "lr"), None)
    for r in rows:
        r["ratio_to_lr"] = (
            None if lr_time is None or r["time_to_target_s"] is None else r["time_to_target_s"] / lr_time
        )
    import sklearn
    import torch

    meta = {
        "n_train": args.n_train,
        "n_test": args.n_test,
        "n_features": args.n_features,
        "n_classes": args.n_classes,
        "alpha": args.alpha,
        "threads": args.threads,
        "target_accuracy": target,
        "data_write_s": make_s,
        "x_file_mb": paths["X"].stat().st_size / 2**20,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    lines = [
        f"| {r['model']} | {r['device']} | {fmt(r['time_to_target_s'], '.1f')} | {r['train_s']:.1f} | "
        f"{r['n_iter']} | {r['test_accuracy']:.4f} | {fmt(r['ratio_to_lr'], '.2f')} | "
        f"{r['peak_rss_mb']:.0f} | {r['anon_rss_over_baseline_mb']:.0f} | {r['tracemalloc_peak_mb']:.0f} |"
        for r in rows
    ]
    text = (
        "# Large linear probe: mini-batch (memmap) vs LogisticRegression vs SGDClassifier\n\n"
        f"make_embedding_classification, {args.n_train} train + {args.n_test} test x {args.n_features}, "
        f"{args.n_classes} classes; X is a {meta['x_file_mb']:.0f} MB float32 .npy opened with "
        f"mmap_mode='r'. alpha={args.alpha} (C = 1/(alpha n)); {args.threads} thread(s); one run each, "
        f"each in its own process. Target: LogisticRegression's test accuracy ({target:.4f}). Load "
        f"average {load_start[0]:.1f} at the start, {meta['load_average_at_end'][0]:.1f} at the end on "
        f"{os.cpu_count()} cores. Command: `{meta['command']}`.\n\n"
        "time to target: training time (including the standardisation pass) until the test accuracy "
        "first reaches the target, per-epoch evaluations excluded. Memory: peak RSS (ru_maxrss; includes "
        "the memmap's page cache that was read), peak anonymous RSS over the process's baseline after "
        "imports (what the method allocated), tracemalloc peak (Python/numpy allocations only).\n\n"
        "| model | device | time to target (s) | train (s) | iterations/epochs | test accuracy | ratio vs LR "
        "| peak RSS (MB) | anon RSS over baseline (MB) | tracemalloc peak (MB) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n"
    )
    print(text)
    write_results("large_probe", text, {"meta": meta, "rows": rows}, args.tag)


if __name__ == "__main__":
    main()
