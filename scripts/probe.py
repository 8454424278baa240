"""Run one training probe of the miniature model: train in chunks, score the EMA weights after each chunk.

    python scripts/probe.py configs/probes/NAME.yaml [--every 500] [--n 112] [--final-n 336] [--threads 1]

Appends one JSON line per look to docs/probes/NAME.jsonl (step, minutes of training, held-out accuracy per
family on `--n` samples of data seed 1) and, at the end, the final look on `--final-n` samples to
docs/probes/results.jsonl. Scoring time is not counted in the minutes. SIGTERM stops it after a checkpoint;
rerunning resumes (the trainer resumes from its last checkpoint; looks already written are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from learning_curve import score, training_minutes

from omnigen.training.config import TrainConfig
from omnigen.training.trainer import train

PROBES = Path("docs/probes")


def _done_steps(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    return {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()}


def _latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--every", type=int, default=500, help="steps between looks")
    parser.add_argument("--n", type=int, default=112, help="samples per look")
    parser.add_argument("--final-n", type=int, default=336, help="samples of the final look")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument(
        "--stop-at", type=int, default=None, help="end the probe at this step (default: the config's)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.nice:
        os.nice(args.nice)
    config = TrainConfig.load(args.config)
    name = args.config.stem
    run = Path(config.out_dir)
    PROBES.mkdir(parents=True, exist_ok=True)
    curve = PROBES / f"{name}.jsonl"
    done = _done_steps(curve)
    end = min(config.total_steps, args.stop_at or config.total_steps)
    while True:
        step = _latest_step(run)
        if step >= end:
            break
        target = min(end, (step // args.every + 1) * args.every)
        train(config, stop_after=target)
        step = _latest_step(run)
        if step < target:  # the trainer stopped early (SIGTERM): it has checkpointed, so end here
            print(f"stopped at step {step}; rerun the same command to resume", flush=True)
            return
        latest = f"step_{step:08d}"
        if step in done or step >= end:
            continue
        started = time.perf_counter()
        record = {"step": step, "minutes": round(training_minutes(run).get(step, 0.0), 1)}
        record |= score(run, run / "checkpoints" / latest, args.n)
        record["score_seconds"] = round(time.perf_counter() - started, 1)
        record["load"] = os.getloadavg()[0]
        with curve.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.add(step)
        print(json.dumps(record), flush=True)
    step = _latest_step(run)
    latest = f"step_{step:08d}"
    record = {"probe": name, "step": step, "minutes": round(training_minutes(run).get(step, 0.0), 1)}
    record |= score(run, run / "checkpoints" / latest, args.final_n)
    record["n"] = args.final_n
    with curve.open("a") as f:
        f.write(json.dumps({**record, "final": True}) + "\n")
    with (PROBES / "results.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
