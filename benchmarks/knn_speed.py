"""kNN search speed: FaissKNNClassifier (exact flat and IVF) against scikit-learn NearestNeighbors (brute).

Measures, on synthetic clustered embeddings (a Gaussian mixture in a ``--intrinsic-dim`` subspace plus
isotropic noise, since pooled image features have a low intrinsic dimension; ``--intrinsic-dim 0`` draws
the mixture in all ``--d`` dimensions; queries come from the same mixture as the database):

* build time (``fit``) and queries per second (``kneighbors``, k=10) of the exact faiss index and of
  scikit-learn's brute-force search, both through their estimator APIs, same data, same thread count;
* the same for the IVF index, with recall@10 of IVF against the exact neighbours for a few ``nprobe``;
* the GPU index too, when faiss sees a GPU.

Medians over ``--repeats`` runs. Each faiss search is timed right after a scikit-learn search of the same
queries and the speedup is the median of these paired ratios, so that load from other processes on a
shared machine hits both sides alike. Writes
``benchmarks/results/knn_speed.md`` and ``.json``.

Usage::

    python benchmarks/knn_speed.py            # quick: 20k x 512 database, 500 queries
    python benchmarks/knn_speed.py --full     # 100k x 512 database, 1000 queries
    python benchmarks/knn_speed.py --full --intrinsic-dim 0 --name knn_speed_fullrank
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import sklearn
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from luab_sk.estimators.knn import FaissKNNClassifier

RESULTS = Path(__file__).resolve().parent / "results"
K = 10


def clustered_embeddings(n, d, n_clusters, intrinsic_dim, seed):
    """Gaussian mixture in a random `intrinsic_dim`-dimensional subspace of R^d, plus small noise.

    The subspace and the cluster centres depend only on the shapes (seed 0), so database and queries
    (drawn with different `seed`) share them.
    """
    shared = np.random.default_rng(0)
    latent = intrinsic_dim or d
    basis = np.linalg.qr(shared.normal(size=(d, latent)))[0].T if intrinsic_dim else np.eye(d)
    centers = shared.normal(size=(n_clusters, latent))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, size=n)
    Z = centers[labels] + rng.normal(scale=0.7, size=(n, latent))
    X = Z @ basis + rng.normal(scale=0.05, size=(n, d))
    return X.astype(np.float32), labels


def timed(fn, repeats):
    """Median wall time of `repeats` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def timed_against(fn, reference, repeats):
    """Median time of `fn()` and median of the paired ratios time(reference()) / time(fn())."""
    times, ratios = [], []
    for _ in range(repeats):
        ref_s, _ = timed(reference, 1)
        own_s, result = timed(fn, 1)
        times.append(own_s)
        ratios.append(ref_s / own_s)
    return statistics.median(times), statistics.median(ratios), result


def recall_at_k(found, truth):
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def run(args):
    X, y = clustered_embeddings(args.n, args.d, args.clusters, args.intrinsic_dim, seed=1)
    Q, _ = clustered_embeddings(args.queries, args.d, args.clusters, args.intrinsic_dim, seed=2)
    rows = []
    with threadpool_limits(args.threads):
        faiss.omp_set_num_threads(args.threads)
        for metric, sk_metric in (("cosine", "cosine"), ("l2", "euclidean")):
            sk = NearestNeighbors(n_neighbors=K, algorithm="brute", metric=sk_metric)
            sk_build, _ = timed(lambda sk=sk: sk.fit(X), args.repeats)
            sk_search, (_, truth) = timed(lambda sk=sk: sk.kneighbors(Q), 1)
            rows.append(_row(metric, "sklearn brute", sk_build, sk_search, 1.0, None, args))

            def search(model, sk=sk):
                """Median search time, median paired speedup over sklearn, and the neighbour ids."""
                seconds, speedup, (_, ids) = timed_against(
                    lambda: model.kneighbors(Q), lambda: sk.kneighbors(Q), args.repeats
                )
                return seconds, speedup, ids

            flat = FaissKNNClassifier(n_neighbors=K, metric=metric, index="flat", device="cpu")
            build, _ = timed(lambda flat=flat: flat.fit(X, y), args.repeats)
            seconds, speedup, exact = search(flat)
            recall = recall_at_k(exact, truth)
            rows.append(_row(metric, "faiss flat (exact)", build, seconds, speedup, recall, args))

            ivf = FaissKNNClassifier(n_neighbors=K, metric=metric, index="ivf", device="cpu", random_state=0)
            build, _ = timed(lambda ivf=ivf: ivf.fit(X, y), 1)
            nlist, default_nprobe = ivf.index_.index.nlist, ivf.index_.index.nprobe
            for nprobe in (default_nprobe // 4, default_nprobe // 2, default_nprobe, 2 * default_nprobe):
                ivf.index_.index.nprobe = max(1, nprobe)
                seconds, speedup, found = search(ivf)
                name = f"faiss IVF nlist={nlist} nprobe={ivf.index_.index.nprobe}"
                rows.append(_row(metric, name, build, seconds, speedup, recall_at_k(found, exact), args))

            if faiss.get_num_gpus() > 0:
                gpu = FaissKNNClassifier(n_neighbors=K, metric=metric, index="flat", device="cuda")
                build, _ = timed(lambda gpu=gpu: gpu.fit(X, y), args.repeats)
                if gpu.index_.on_gpu:
                    seconds, speedup, found = search(gpu)
                    recall = recall_at_k(found, exact)
                    rows.append(_row(metric, "faiss flat GPU", build, seconds, speedup, recall, args))
    return rows


def _row(metric, method, build_s, search_s, speedup, recall, args):
    return {
        "metric": metric,
        "method": method,
        "build_s": round(build_s, 4),
        "queries_per_s": round(args.queries / search_s, 1),
        "speedup_vs_sklearn": round(speedup, 2),
        "recall_at_10": None if recall is None else round(recall, 4),
    }


def to_markdown(rows, meta):
    lines = [
        "# kNN search speed: faiss vs scikit-learn brute force",
        "",
        f"Database {meta['n']} x {meta['d']} float32 ({meta['clusters']}-component Gaussian mixture, "
        f"intrinsic dimension {meta['intrinsic_dim'] or meta['d']}), "
        f"{meta['queries']} queries, k={K}, {meta['threads']} thread(s), median of {meta['repeats']} runs "
        f"(IVF build and sklearn rows: 1 run). recall@10: of the exact faiss neighbours for IVF/GPU, of "
        f"scikit-learn's for faiss flat. Speedup: median over runs of scikit-learn's search time / this "
        f"method's, each pair timed back to back.",
        "",
        f"Machine: {meta['machine']}; faiss {meta['faiss']}, scikit-learn {meta['sklearn']}; "
        f"GPUs seen by faiss: {meta['faiss_gpus']}; 1-minute load average at the end of the run: "
        f"{meta.get('load_average_1min_at_end', 'not recorded')}.",
        "",
        "| metric | method | build (s) | queries/s | speedup vs sklearn | recall@10 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        recall = "" if r["recall_at_10"] is None else f"{r['recall_at_10']:.4f}"
        lines.append(
            f"| {r['metric']} | {r['method']} | {r['build_s']:.3f} | {r['queries_per_s']:.0f} | "
            f"{r['speedup_vs_sklearn']:.2f}x | {recall} |"
        )
    exact = {r["metric"]: r["speedup_vs_sklearn"] for r in rows if r["method"] == "faiss flat (exact)"}
    verdict = "met" if min(exact.values()) >= 5 else "not met"
    lines += [
        "",
        f"Target, exact search at least 5x faster than scikit-learn brute force on CPU: {verdict} "
        f"({', '.join(f'{m} {x:.2f}x' for m, x in exact.items())}).",
    ]
    if not meta["faiss_gpus"]:
        lines.append("No GPU was available to this run, so there are no GPU rows.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100k x 512 database, 1000 queries")
    parser.add_argument("--n", type=int, default=20_000, help="database rows (default 20000)")
    parser.add_argument("--d", type=int, default=512, help="dimension (default 512)")
    parser.add_argument("--queries", type=int, default=500, help="queries (default 500)")
    parser.add_argument("--clusters", type=int, default=1000, help="mixture components (default 1000)")
    parser.add_argument("--intrinsic-dim", type=int, default=64, help="latent dimension, 0 = d (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--name", default="knn_speed", help="results file stem (default knn_speed)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both (default 1)")
    args = parser.parse_args(argv)
    if args.full:
        args.n, args.queries = 100_000, 1000
    rows = run(args)
    meta = {
        "n": args.n,
        "d": args.d,
        "queries": args.queries,
        "clusters": args.clusters,
        "intrinsic_dim": args.intrinsic_dim,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "faiss": faiss.__version__,
        "sklearn": sklearn.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    table = to_markdown(rows, meta)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(table)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
