"""bench_pipeline's side of the original ``omnigen`` 1.0.3 contenders: the weights folder and the runner.

``write_original_folder`` writes our pipeline's random weights in the OmniGen-v1 layout the original
loads (config.json in Phi-3 form, model.safetensors with the original key names, tokenizer.json +
tokenizer_config.json for ``AutoTokenizer``, ``vae/``) plus the input images as PNG files (the original's
processor opens paths). ``OriginalRunner`` starts ``original_runner.py`` under the python of the
original's own virtual environment (``benchmarks/setup_original.sh``) and sends it one call at a time, so
bench_pipeline can alternate it with the contenders of this process; a fresh runner per call gives the
fresh-process memory figures.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from omnigen.pipeline import OmniGenPipeline
from omnigen.weights.checkpoint import save_model

RUNNER = Path(__file__).with_name("original_runner.py")
ORIGINAL_SEPARATE = "original (cache, separate CFG)"  # the original's default call
ORIGINAL_BATCHED = "original (cache, batched CFG)"  # separate_cfg_infer=False
ORIGINAL_MODES = {ORIGINAL_SEPARATE: True, ORIGINAL_BATCHED: False}  # name -> separate_cfg_infer
# What AutoTokenizer needs beside tokenizer.json to load it as is (the class; nothing else added).
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}


def write_original_folder(pipe: OmniGenPipeline, images: list[np.ndarray], folder: Path) -> list[str]:
    """The pipeline's model, tokenizer and VAE as an OmniGen-v1 folder; returns the images' PNG paths."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(pipe.model, folder)
    pipe.tokenizer.save(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    pipe.codec.save(folder)
    inputs = folder / "inputs"
    inputs.mkdir(exist_ok=True)
    paths = []
    for k, image in enumerate(images, start=1):
        path = inputs / f"image_{k}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def original_call(prompt: str, image_paths: list[str], size: int, steps: int, separate: bool) -> dict:
    """Keyword arguments of the original's ``OmniGenPipeline.__call__`` for one benchmark task."""
    return {
        "prompt": prompt,
        "input_images": image_paths or None,
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "guidance_scale": 3.0,
        "img_guidance_scale": 1.6,
        "max_input_image_size": size,
        "separate_cfg_infer": separate,
        "use_kv_cache": True,
        "seed": 0,
    }


@dataclass(frozen=True)
class OriginalResult:
    """One call, timed by the runner; the first four fields are those of bench_pipeline's ``Timing``."""

    total: float  # seconds, call start to the end of the VAE decode
    transformer: float  # seconds, call start to the start of the decode (processor, encode, sampling)
    peak_mb: float  # resident memory growth by the end of the decode
    latents: torch.Tensor  # (1, C, h, w), model space
    peak_sampling_mb: float  # ... by the start of the decode


class OriginalRunner:
    """One ``original_runner.py`` process; ``call`` blocks until the runner answers."""

    def __init__(self, python: str, folder: Path, threads: int, log: Path) -> None:
        self.log = log
        self.scratch = tempfile.TemporaryDirectory(prefix="original-latents-")
        with log.open("a") as stderr:
            self.process = subprocess.Popen(
                [python, str(RUNNER), "--model", str(folder), "--threads", str(threads)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the original's runner exited (rc {self.process.poll()}); see {self.log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the original's runner failed:\n{reply['error']}")
        return reply

    def call(self, call: dict, full_step0_attention: bool = False) -> OriginalResult:
        """One call of the original; ``full_step0_attention``: the runner's diagnostic (never timed)."""
        out = Path(self.scratch.name) / "latents.safetensors"
        command = {"call": call, "latents_out": str(out), "full_step0_attention": full_step0_attention}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        latents = load_file(str(out))["latents"]
        return OriginalResult(
            reply["total_s"], reply["sampling_s"], reply["peak_total_mb"], latents, reply["peak_sampling_mb"]
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.scratch.cleanup()

    def __enter__(self) -> OriginalRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OriginalSession:
    """The folder (in a temporary directory) and one long-lived runner for the timed, alternating runs;
    ``fresh_peak`` starts a runner of its own for each memory figure. Calls use bench_pipeline's settings
    (``size``, ``steps``, guidance 3.0 / 1.6, seed 0)."""

    def __init__(
        self,
        python: str,
        pipe: OmniGenPipeline,
        images: list[np.ndarray],
        threads: int,
        size: int,
        steps: int,
    ) -> None:
        if not Path(python).is_file():
            raise SystemExit(
                f"--original-python {python} does not exist; create the venv with benchmarks/setup_original.sh"
            )
        self.python, self.threads, self.size, self.steps = python, threads, size, steps
        self.tmp = tempfile.TemporaryDirectory(prefix="omnigen-original-")
        self.folder = Path(self.tmp.name) / "model"
        self.log = Path(self.tmp.name) / "runner.log"
        self.image_paths = write_original_folder(pipe, images, self.folder)
        self.runner = OriginalRunner(python, self.folder, threads, self.log)

    def describe(self) -> str:
        info = self.runner.info
        return (
            f"# original omnigen {info['omnigen']} in its own process: torch {info['torch']}, transformers "
            f"{info['transformers']}, diffusers {info['diffusers']}, attention {info['attention']}, "
            f"{info['threads']} threads; same weights, VAE and tokenizer (written as an OmniGen-v1 folder), "
            "fp32, input images encoded to the posterior mean as ours do (benchmarks/original_runner.py)"
        )

    def task_call(self, prompt: str, k: int, separate: bool) -> dict:
        """The original's call for a task with ``k`` input images (the folder's first ``k``)."""
        return original_call(prompt, self.image_paths[:k], self.size, self.steps, separate)

    def contenders(self, prompt: str, k: int) -> dict[str, Callable[[], OriginalResult]]:
        """name -> one timed call of that mode in the long-lived runner."""
        return {
            name: partial(self.runner.call, self.task_call(prompt, k, separate))
            for name, separate in ORIGINAL_MODES.items()
        }

    def fresh_peak(self, name: str, prompt: str, k: int) -> tuple[float, float]:
        """Peak RSS growth (sampling, with decode) of one call in a runner process started for it alone."""
        with OriginalRunner(self.python, self.folder, self.threads, self.log) as runner:
            result = runner.call(self.task_call(prompt, k, ORIGINAL_MODES[name]))
        return result.peak_sampling_mb, result.peak_mb

    def check(self, prompt: str, k: int, exact: torch.Tensor, timed: dict[str, torch.Tensor]) -> str:
        """The output check: the original's uncached call (its own code, nothing patched) must equal the
        exact reference; the cached modes' deviation is shown to be its step-0 cache (see the runner)."""
        call = self.task_call(prompt, k, True)
        uncached = self.runner.call({**call, "use_kv_cache": False}).latents
        fixed = self.runner.call(call, full_step0_attention=True).latents
        err = {name: (latents - exact).abs().max().item() for name, latents in timed.items()}
        d_uncached, d_fixed = ((x - exact).abs().max().item() for x in (uncached, fixed))
        return (
            f"outputs: the original without its cache vs the reference run row by row {d_uncached:.2e} "
            f"[{'PASS' if d_uncached <= 1e-3 else 'FAIL'} <= 1e-3] (same weights, noise, ids, pixels); its "
            f"cached modes {err[ORIGINAL_SEPARATE]:.2e} (separate) / {err[ORIGINAL_BATCHED]:.2e} (batched): "
            f"its step-0 cache attends to the condition only; with step 0 attending to the whole sequence "
            f"{d_fixed:.2e}"
        )

    def close(self) -> None:
        self.runner.close()
        self.tmp.cleanup()

    def __enter__(self) -> OriginalSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
