"""CFG-parallel from Python: every rank of an initialized process group makes the same call
(docs/scaling.md). Run: torchrun --nproc-per-node 2 scripts/cfg_parallel_example.py"""

import torch.distributed as dist

from omnigen import OmniGenPipeline

dist.init_process_group("gloo")  # under torchrun; "nccl" with one GPU per rank
pipe = OmniGenPipeline.from_pretrained()
image = pipe("a red square", num_inference_steps=3, seed=0, parallel="cfg")[0]
if dist.get_rank() == 0:
    image.save("red.png")
dist.destroy_process_group()
