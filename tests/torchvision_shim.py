"""The four torchvision transforms the reference processors use (diffusers' OmniGen processor and the
original package's): torchvision cannot be installed beside the CPU torch wheel here. Plain Python, so
the original-package runner (another interpreter environment) can import it too."""

from __future__ import annotations

import numpy as np
import torch


class Transforms:
    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for fn in self.fns:
                x = fn(x)
            return x

    class Lambda:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, x):
            return self.fn(x)

    class ToTensor:
        def __call__(self, image):
            return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

        def __call__(self, x):
            return (x - self.mean) / self.std
