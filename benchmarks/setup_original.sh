#!/usr/bin/env bash
# Creates the virtual environment that runs the original omnigen 1.0.3 package for bench_pipeline.py:
#
#   bash benchmarks/setup_original.sh [VENV]        # default /work/venv-original (outside the repository)
#   python benchmarks/bench_pipeline.py --original-python VENV/bin/python ...
#
# The original pins torch==2.3.1; it runs beside torch 2.13 with its other pins, installed without
# dependencies. Its imports of timm and torchvision are served by the stub and shim in
# benchmarks/original_runner.py, so neither is installed. Nothing of the original lands in this repository.
set -euo pipefail
venv="${1:-/work/venv-original}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 transformers==4.45.2 diffusers==0.30.3 accelerate==0.26.1 \
    peft==0.9.0 safetensors "huggingface_hub<0.26" pillow psutil
"$venv/bin/pip" install -q --no-deps omnigen==1.0.3
"$venv/bin/python" -c "import transformers, diffusers, torch; print('original venv ready:', '$venv', \
'torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
