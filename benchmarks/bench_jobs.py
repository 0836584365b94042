"""Training-job benchmark: what the service adds around the trainer.

(a) upload: a phantom nnU-Net dataset (``--cases`` cases of 256 x 256 x ``--slices``) packed by
    the client (a plain tar: its images are .nii.gz already), sent to ``POST /v1/uploads``, extracted safely and read back as a
    dataset by the server: sizes, seconds, MB/s.
(b) job overhead: ``--jobs`` tiny jobs (SAM-2.1 tiny at random init, 64 px, 4 steps) queued at once
    on a CPU service (one at a time), each followed through its states: submit -> running (the
    scheduler), running -> first progress line (the trainer process starting: imports, model),
    first line -> "done" event (training), "done" event -> state done (the server noticing the
    end), and the hand-over from one job's end to the next one's start.

The service is a child process (LocalService) and the trainers its children; the JSON records the
load average before and after (other processes on a shared machine inflate every time).

    python benchmarks/bench_jobs.py [--cases 20] [--slices 20] [--jobs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_results  # noqa: E402

from sss_lib.phantoms import make_phantom_dataset  # noqa: E402
from sss_lib.service.client_jobs import pack_dataset  # noqa: E402
from sss_lib.service.local import LocalService  # noqa: E402

SETTINGS = {"backbone": "sam2.1_hiera_tiny", "random_init": True, "image_size": 64, "threads": 1,
            "labeled_batch": 2, "decoder_batch": 2, "checkpoint_every": 2, "val_every": 4,
            "val_cases": ["case_002"], "iterations": 4}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def bench_upload(client: Any, dataset: Path, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    archive = pack_dataset(dataset, work / "ds.tar")
    t_pack = time.perf_counter() - t0
    t0 = time.perf_counter()
    answer = client.upload_dataset(archive)
    t_upload = time.perf_counter() - t0
    mb = os.path.getsize(archive) / 1e6
    return {"dataset_mb": folder_mb(dataset), "archive_mb": mb, "cases": answer["cases"], "pack_s": t_pack,
            "upload_extract_s": t_upload, "upload_mb_per_s": mb / t_upload}


def bench_jobs(client: Any, n_jobs: int) -> list[dict[str, Any]]:
    submitted = {}
    for _ in range(n_jobs):
        t = time.time()
        submitted[client.submit_job({"path": "Dataset001_Lab"}, settings=SETTINGS)["job_id"]] = t
    rows = []
    for jid, t_submit in submitted.items():
        records = list(client.follow(jid, wait=5))
        job = client.job(jid)
        assert job["state"] == "done", job
        first = records[0]["time"]
        done_event = next(r for r in records if r["event"] == "done")["time"]
        rows.append({"job_id": jid, "submit_to_running_s": job["started"] - t_submit,
                     "trainer_start_s": first - job["started"], "training_s": done_event - first,
                     "done_noticed_s": job["ended"] - done_event, "started": job["started"], "ended": job["ended"]})
    for prev, row in zip(rows, rows[1:]):
        row["handover_s"] = row["started"] - prev["ended"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        big = make_phantom_dataset(work / "Dataset002_Big", args.cases, seed=3, n_slices=args.slices,
                                   size=(256, 256), spacing=(1.5, 1.5, 8.0))
        root = work / "root"
        make_phantom_dataset(root / "Dataset001_Lab", 3, seed=7, n_slices=4, size=(48, 48), spacing=(4.0, 4.0, 8.0))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SSS_HOME": str(work / "home")}
        svc = LocalService(["--device", "cpu", "--jobs-dir", str(work / "jobs"), "--data-root", str(root)], env=env)
        with svc:
            client = svc.client()
            upload = bench_upload(client, big, work)
            jobs = bench_jobs(client, args.jobs)
    load_after = os.getloadavg()

    print(markdown_table(["dataset MB", "archive MB", "cases", "pack s", "upload+extract s", "MB/s"],
                         [[upload["dataset_mb"], upload["archive_mb"], upload["cases"], upload["pack_s"],
                           upload["upload_extract_s"], upload["upload_mb_per_s"]]]))
    print()
    keys = ["submit_to_running_s", "trainer_start_s", "training_s", "done_noticed_s", "handover_s"]
    print(markdown_table(["job", *keys], [[r["job_id"], *[r.get(k, "") for k in keys]] for r in jobs]))
    summary = {k: statistics.median(r[k] for r in jobs if k in r) for k in keys if any(k in r for r in jobs)}
    print("\nmedians: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    path = write_results("bench_jobs", {"upload": upload, "jobs": jobs, "medians": summary,
                                        "settings": SETTINGS, "load_before": load_before, "load_after": load_after})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
