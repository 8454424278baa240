"""Peak host memory of loading an fp32 checkpoint in bf16: the streaming loader vs reading the whole file.

    python benchmarks/bench_load.py [--layers 4] [--folder /tmp/omnigen-scaled] [--keep]

Writes (once) a scaled OmniGen-v1 checkpoint: the real hidden size 3072 and vocabulary 32064, the stored
36864 x 3072 position table, ``--layers`` decoder layers (4: 2.7 GB in fp32). Then, each in a fresh
process: ``load_model(folder, dtype=bfloat16)`` (streaming), and the whole-file way it replaced
(``safetensors.torch.load_file`` + cast + ``build_model``). Printed per way: the peak resident memory
(VmHWM, this process only) above the level just before loading, against the file size and the bf16 model.
The first meta-device operation (~75 MB of torch's own imports) runs before the baseline is taken.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_fullsize import build_random_model, full_config

from omnigen.weights.checkpoint import save_model

CHILD = """
import sys, torch
torch.set_num_threads(1)
with torch.device("meta"):
    torch.empty(1) + 1
from omnigen.weights.checkpoint import build_model, load_config, load_model, resolve_layout
from safetensors.torch import load_file

def rss(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

folder, way = sys.argv[1], sys.argv[2]
base = rss("VmRSS")
if way == "streaming":
    model, _ = load_model(folder, dtype=torch.bfloat16)
else:
    state = load_file(folder + "/model.safetensors")
    model = build_model(load_config(resolve_layout(folder)), state, dtype=torch.bfloat16)
    del state
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print("RESULT", rss("VmHWM") - base, size)
"""


def measure(folder: Path, way: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), way], capture_output=True, text=True, check=True
    ).stdout
    growth, model_bytes = (int(x) for x in out.split("RESULT")[1].split())
    return growth, model_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--folder", type=Path, default=None, help="where to write the checkpoint (reused)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.gettempdir()) / f"omnigen-scaled-{args.layers}"
    if not (folder / "model.safetensors").is_file():
        model = build_random_model(full_config(args.layers), torch.float32)
        save_model(model, folder)
        del model
    file_gb = (folder / "model.safetensors").stat().st_size / 1e9
    print(
        f"# fp32 checkpoint: hidden 3072, vocab 32064, {args.layers} layers, {file_gb:.2f} GB; load in bf16"
    )
    print(f"{'loader':12} {'peak growth GB':>14} {'x file':>7} {'bf16 model GB':>13}")
    try:
        for way in ("streaming", "whole-file"):
            growth, model_bytes = measure(folder, way)
            print(f"{way:12} {growth / 1e9:14.2f} {growth / 1e9 / file_gb:7.2f} {model_bytes / 1e9:13.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
