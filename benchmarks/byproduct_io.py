"""Byproduct reading speed: ImageNet-AB XML files per second and COCO-AB records per second, with peak memory.

Writes realistic generated data (``make_imagenet_ab_like`` / ``make_coco_ab_like``: several tasks per image,
60 Hz-ish mouse traces, hover records; COCO records of a few KB with add/move/remove actions and mouse
tracks), then measures, each run in a fresh process:

* ImageNet-AB: ``read_imagenet_ab`` (defusedxml, every field) serially, serially without traces, and with
  ``n_jobs`` processes, and ``iter_imagenet_ab_chunks`` with ``n_jobs`` processes (records dropped after
  each chunk, as when encoding chunk by chunk); against the reference loader's way (stdlib ``xml.etree``
  ``parse`` + ``findall`` of the selected clicks only, no defusing), serially.
* COCO-AB: ``iter_coco_ab`` streamed without keeping records (bounded memory), ``read_coco_ab`` keeping all
  records with traces; against ``json.load`` of the whole file and, when installed, ``ijson.items``.

Wall rates depend on the machine's load (reported); CPU rates (``time.process_time``) are the per-core
throughput. Extrapolations: the 1.28M-file ImageNet-AB at the measured parallel wall rate and at twice the
serial CPU rate (2 cores), and the 400 MB COCO-AB at the measured rates. Medians over ``--repeats`` runs;
ratios are against the peer measured in the same run. Writes ``benchmarks/results/byproduct_io.md`` and
``.json``.

Usage::

    python benchmarks/byproduct_io.py            # quick: 4,000 XML files, a 20 MB JSON
    python benchmarks/byproduct_io.py --full     # 20,000 XML files, a 100 MB JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IMAGENET_FILES = 1_281_167
COCO_MB = 400.0
BYTES_PER_COCO_RECORD = 3600  # what make_coco_ab_like writes on average (measured)


def _status_mb(field):
    """VmRSS (current) or VmHWM (peak) of this process, in MB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak measures the work, not the imports."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(task, path, n_jobs):
    """Run one task in this (fresh) process: count, wall s, CPU s, peak RSS above the starting RSS in MB."""
    import xml.etree.ElementTree as ET

    from luab_sk.byproducts import (
        iter_coco_ab,
        iter_imagenet_ab_chunks,
        list_imagenet_ab_files,
        read_coco_ab,
        read_imagenet_ab,
    )

    _reset_peak_rss()
    base = _status_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    if task == "xml_reference":
        points = []
        for p in list_imagenet_ab_files(path):
            clicks = [
                (float(m.find("selectedRecord/x").text), float(m.find("selectedRecord/y").text))
                for m in ET.parse(p).getroot().findall("metadata")
                if m.find("selected").text == "True"
            ]
            points.append(clicks)
        n = len(points)
    elif task == "xml_serial":
        n = len(read_imagenet_ab(path))
    elif task == "xml_serial_no_traces":
        n = len(read_imagenet_ab(path, traces=False))
    elif task == "xml_parallel":
        n = len(read_imagenet_ab(path, n_jobs=n_jobs, chunk_size=500))
    elif task == "xml_parallel_chunks":
        n = sum(len(chunk) for chunk in iter_imagenet_ab_chunks(path, n_jobs=n_jobs, chunk_size=500))
    elif task == "json_load":
        with open(path, encoding="utf-8") as f:
            n = len(json.load(f))
    elif task == "ijson_items":
        import ijson

        with open(path, "rb") as f:
            n = sum(1 for _ in ijson.items(f, "item", use_float=True))
    elif task == "coco_stream":
        n = sum(1 for _ in iter_coco_ab(path, traces=False))
    elif task == "coco_read":
        n = len(read_coco_ab(path))
    else:
        raise ValueError(f"unknown task {task!r}")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_mb("VmHWM") - base
    return {"n": n, "wall_s": wall, "cpu_s": cpu, "peak_mb": max(peak, 0.0)}


def run_task(task, path, n_jobs, repeats):
    """Medians over `repeats` fresh processes."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--_measure", task, str(path), "--n-jobs", str(n_jobs)],
            check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_mb")}
    return {"task": task, "n": runs[0]["n"], "repeats": repeats, **med}


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--full", action="store_true", help="20,000 XML files and a 100 MB JSON")
    parser.add_argument("--xml-files", type=int, help="number of XML files (default 4,000; --full 20,000)")
    parser.add_argument("--json-mb", type=float, help="COCO-AB JSON size in MB (default 20; --full 100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--workdir", help="where to write the generated data (default: a temporary folder)")
    parser.add_argument("--_measure", nargs=2, metavar=("TASK", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(_measure(args._measure[0], args._measure[1], args.n_jobs)))
        return

    from luab_sk.datasets.imagenet_ab_like import make_coco_ab_like, make_imagenet_ab_like

    n_xml = args.xml_files or (20_000 if args.full else 4_000)
    json_mb = args.json_mb or (100.0 if args.full else 20.0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="byproduct_io_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        xml_dir = work / "train_xml"
        n_classes = max(1, n_xml // 1000)
        make_imagenet_ab_like(xml_dir, n_classes=n_classes, n_per_class=n_xml // n_classes, random_state=0)
        xml_bytes = sum(f.stat().st_size for f in xml_dir.rglob("*.xml") if not f.name.startswith("._"))
        json_path = work / "coco_ab.json"
        n_records = int(json_mb * 1e6 / BYTES_PER_COCO_RECORD)
        make_coco_ab_like(json_path, n_images=n_records, random_state=0)
        json_size_mb = json_path.stat().st_size / 1e6
        took = time.perf_counter() - t0
        print(f"generated {n_xml} XML files ({xml_bytes / n_xml / 1e3:.1f} kB avg) and a "
              f"{json_size_mb:.1f} MB JSON of {n_records} records in {took:.0f} s", flush=True)
        load_before = os.getloadavg()
        results = {}
        for task in ("xml_reference", "xml_serial", "xml_serial_no_traces", "xml_parallel",
                     "xml_parallel_chunks"):
            results[task] = run_task(task, xml_dir, args.n_jobs, args.repeats)
            print(task, results[task], flush=True)
        coco_tasks = ["json_load", "coco_stream", "coco_read"]
        try:
            import ijson  # noqa: F401

            coco_tasks.insert(1, "ijson_items")
        except ImportError:
            print("ijson not installed: skipping that peer")
        for task in coco_tasks:
            results[task] = run_task(task, json_path, args.n_jobs, args.repeats)
            print(task, results[task], flush=True)
        load_after = os.getloadavg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for task, peer in (
        ("xml_reference", "xml_reference"), ("xml_serial", "xml_reference"),
        ("xml_serial_no_traces", "xml_reference"), ("xml_parallel", "xml_reference"),
        ("xml_parallel_chunks", "xml_reference"),
        ("json_load", "json_load"), ("ijson_items", "json_load"), ("coco_stream", "json_load"),
        ("coco_read", "json_load"),
    ):
        if task not in results:
            continue
        r, p = results[task], results[peer]
        rows.append({
            **r,
            "peer": peer,
            "rate_wall": r["n"] / r["wall_s"],
            "rate_cpu": None if task.startswith("xml_parallel") else r["n"] / r["cpu_s"],
            "speed_vs_peer": p["wall_s"] / r["wall_s"],
            "mb_per_s": (json_size_mb / r["wall_s"]) if task in coco_tasks else None,
        })
    by = {row["task"]: row for row in rows}
    extrapolation = {
        "imagenet_1.28M_min_at_parallel_wall_rate": IMAGENET_FILES / by["xml_parallel"]["rate_wall"] / 60,
        "imagenet_1.28M_min_at_2x_serial_cpu_rate": IMAGENET_FILES / (2 * by["xml_serial"]["rate_cpu"]) / 60,
        "coco_400MB_s_read_at_wall_rate": COCO_MB / by["coco_read"]["mb_per_s"],
        "coco_400MB_s_stream_at_wall_rate": COCO_MB / by["coco_stream"]["mb_per_s"],
        "coco_400MB_peak_mb_read_all_records": by["coco_read"]["peak_mb"] * COCO_MB / json_size_mb,
        "coco_400MB_peak_mb_stream": by["coco_stream"]["peak_mb"],
    }
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "xml_files": n_xml,
        "xml_avg_kb": xml_bytes / n_xml / 1e3,
        "json_mb": json_size_mb,
        "json_records": n_records,
        "repeats": args.repeats,
        "n_jobs": args.n_jobs,
    }
    names = {
        "xml_reference": "reference loader (stdlib ET, clicks only)",
        "xml_serial": "read_imagenet_ab, 1 process",
        "xml_serial_no_traces": "read_imagenet_ab traces=False, 1 process",
        "xml_parallel": f"read_imagenet_ab n_jobs={args.n_jobs} (all records kept)",
        "xml_parallel_chunks": f"iter_imagenet_ab_chunks n_jobs={args.n_jobs} (stream)",
        "json_load": "json.load (whole file)",
        "ijson_items": "ijson.items (yajl2_c), no records",
        "coco_stream": "iter_coco_ab traces=False (stream)",
        "coco_read": "read_coco_ab (all records kept, traces)",
    }
    lines = [
        "# Byproduct reading speed",
        "",
        f"Generated data: {n_xml} ImageNet-AB XML files ({meta['xml_avg_kb']:.1f} kB avg), COCO-AB JSON of "
        f"{json_size_mb:.1f} MB ({n_records} records). Median of {args.repeats} runs, each in a fresh "
        "process. "
        "Wall rates depend on the load of this shared machine (load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores); CPU rates are "
        "per core. Peak memory: peak RSS above the process's RSS before reading (joblib workers excluded). "
        "Speed: the peer's wall time / this method's, same run.",
        "",
        f"Machine: {meta['machine']}.",
        "",
        "| task | items | wall (s) | items/s (wall) | items/s (CPU) | MB/s | peak MB | speed vs peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mbs = f"{row['mb_per_s']:.1f}" if row["mb_per_s"] is not None else ""
        cpu = f"{row['rate_cpu']:.0f}" if row["rate_cpu"] is not None else "(workers)"
        lines.append(
            f"| {names[row['task']]} | {row['n']} | {row['wall_s']:.2f} | {row['rate_wall']:.0f} | "
            f"{cpu} | {mbs} | {row['peak_mb']:.0f} | {row['speed_vs_peer']:.2f}x |"
        )
    e = extrapolation
    in_min_wall = e["imagenet_1.28M_min_at_parallel_wall_rate"]
    in_min_cpu = e["imagenet_1.28M_min_at_2x_serial_cpu_rate"]
    lines += [
        "",
        "Extrapolation:",
        "",
        f"- ImageNet-AB, 1.28M files: {in_min_wall:.1f} min at the measured n_jobs={args.n_jobs} wall rate "
        f"(this load); {in_min_cpu:.1f} min at twice the serial CPU rate (2 free cores). Target: < 10 min.",
        f"- COCO-AB, 400 MB: read_coco_ab {e['coco_400MB_s_read_at_wall_rate']:.0f} s, peak "
        f"{e['coco_400MB_peak_mb_read_all_records']:.0f} MB (grows with the records kept); streaming "
        f"{e['coco_400MB_s_stream_at_wall_rate']:.0f} s at a constant "
        f"{e['coco_400MB_peak_mb_stream']:.0f} MB. Target: < 60 s, < 1 GB.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "byproduct_io.md").write_text(text)
    payload = {"meta": meta, "rows": rows, "extrapolation": extrapolation}
    (RESULTS / "byproduct_io.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
