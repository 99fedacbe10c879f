"""Issue 28: `train-diffusion` and `train-classifier` on streamed data under `accelerate launch --multi_gpu
--num_processes 2` on CPUs (gloo). Each process draws its own minibatches by index and decodes only those images (LazyImages); the
same images as a folder and as WebDataset tar shards must give the same weights in two processes, as they do in
one (tests/test_stream.py).

    python benchmarks/train_processes.py --work /tmp/train_procs --out docs/results/train_processes.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--widths", "8,16", "--batch-size", "8", "--no-attention"]


def make_data(work: Path, n: int = 240) -> tuple[Path, str]:
    """``n`` 16x16 grey PNGs (a disc, small in every 8th) as a folder and as three tar shards, in the same order."""
    import webdataset as wds
    from PIL import Image

    folder, shards = work / "folder", work / "shards"
    if (work / ".done").is_file():
        return folder, str(shards / "part-*.tar")
    folder.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    writers = [wds.TarWriter(str(shards / f"part-{s:03d}.tar")) for s in range(3)]
    for i in range(n):
        r = 3 if i % 8 == 0 else 6
        img = ((xx - 8) ** 2 + (yy - 8) ** 2 < r * r) * 200.0 + rng.normal(0, 8, (16, 16))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        (folder / f"img{i:04d}.png").write_bytes(buf.getvalue())
        writers[i * 3 // n].write({"__key__": f"img{i:04d}", "png": buf.getvalue()})
    for w in writers:
        w.close()
    (work / ".done").write_text("")
    return folder, str(shards / "part-*.tar")


def launch(args: list, processes: int, env: dict) -> tuple[float, str]:
    # --multi_gpu is accelerate's torchrun launcher; on a machine without GPUs our Accelerator(cpu=True) then joins
    # a gloo group (`--cpu --num_processes 2` starts one process: "rank 0 of 1", tried)
    cmd = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            "29561", "-m", "core", *args] if processes > 1 else [sys.executable, "-m", "core", *args])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0, done.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/train_procs")
    p.add_argument("--out", default="docs/results/train_processes.json")
    a = p.parse_args()
    work = Path(a.work)
    folder, shards = make_data(work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = []
    for procs in (1, 2):
        for kind, data in (("folder", str(folder)), ("tar shards", shards)):
            out = work / f"diffusion_{procs}_{kind.split()[0]}"
            sec, _ = launch(["train-diffusion", "--data", data, "--out", str(out), "--steps", "30", "--size", "16",
                             "--channels", "1", *TINY], procs, env)
            rows.append({"command": "train-diffusion", "processes": procs, "input": kind, "seconds": round(sec, 1),
                         "weights_sha256": sha(out / "model.safetensors")})
            print(rows[-1], flush=True)
    run = work / "diffusion_1_folder"
    for kind, data in (("folder", str(folder)), ("tar shards", shards)):
        scores = work / f"scores_{kind.split()[0]}.csv"
        launch(["score", "--model", str(run), "--data", data, "--out", str(scores), "--distance", "l2", "--draws",
                "1"], 1, env)
        for procs in (1, 2):
            out = work / f"classifier_{procs}_{kind.split()[0]}"
            sec, _ = launch(["train-classifier", "--model", str(run), "--data", data, "--scores", str(scores), "--out",
                             str(out), "--classes", "4", "--steps", "30", "--batch-size", "16", "--eval-every", "30"],
                            procs, env)
            info = json.loads((out / "classifier.json").read_text())
            rows.append({"command": "train-classifier", "processes": procs, "input": kind, "seconds": round(sec, 1),
                         "weights_sha256": sha(out / "classifier.safetensors"),
                         "val_acc": info.get("metrics", {}).get("val_acc")})
            print(rows[-1], flush=True)
    same = {f"{c}, {n} process(es): folder == tar shards":
            len({r["weights_sha256"] for r in rows if r["command"] == c and r["processes"] == n}) == 1
            for c in ("train-diffusion", "train-classifier") for n in (1, 2)}
    for c in ("train-diffusion", "train-classifier"):  # two ranks draw other minibatches than one: proof that two ran
        same[f"{c}: 2 processes differ from 1"] = len({r["weights_sha256"] for r in rows if r["command"] == c}) == 2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rows": rows, "identical_weights": same}, indent=1) + "\n")
    print(json.dumps(same, indent=1))


if __name__ == "__main__":
    main()
