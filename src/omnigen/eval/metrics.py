"""Benchmark metrics: CLIP-I, CLIP-T, DINO similarity and the ControlNet++ controllability metrics.

Owns the metric math and thin feature extractors around `transformers` models loaded from a local folder
or a hub id (CLIP for CLIP-I/CLIP-T, a DINO ViT for DINO: the CLS token of the last layer). The
controllability metrics follow the ControlNet++ evaluation scripts (liming-ai/ControlNet_Plus_Plus,
eval/): Canny F1 over the binary edge maps of a condition's generated images (OpenCV Canny, thresholds
100/200), HED MS-SSIM (torchmetrics' MultiScaleStructuralSimilarityIndexMeasure defaults, data range 1),
depth RMSE over 0-255 maps and segmentation mIoU accumulated over the data set (mmseg's IoUMetric).
Nothing here reads data sets or writes files; `transformers` and `cv2` are imported only when used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

CANNY_LOW, CANNY_HIGH = 100, 200  # the benchmark's OpenCV thresholds
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "CLIP and DINO metrics need transformers: pip install 'omnigen-unified[eval]'"
        ) from err
    return transformers


def _rgb(images: Sequence[Any]) -> list[Image.Image]:
    return [
        img.convert("RGB") if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        for img in images
    ]


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


class _ImageEmbedder:
    """A frozen vision model and its processor; ``images`` embeds in batches to (N, D) unit vectors."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu", batch_size: int = 32):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        raise NotImplementedError

    @torch.no_grad()
    def _batched(self, items: Sequence[Any], embed: Callable[[Sequence[Any]], torch.Tensor]) -> torch.Tensor:
        """``embed`` over chunks of ``batch_size`` items -> (N, D) unit vectors on the CPU."""
        out = [
            embed(items[start : start + self.batch_size]).float().cpu()
            for start in range(0, len(items), self.batch_size)
        ]
        return F.normalize(torch.cat(out), dim=-1)

    def images(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, D) unit vectors."""

        def embed(chunk: Sequence[Any]) -> torch.Tensor:
            pixels = self.processor(images=_rgb(chunk), return_tensors="pt")["pixel_values"]
            return self._embed(pixels.to(self.device))

        return self._batched(images, embed)


class ClipFeatures(_ImageEmbedder):
    """Unit-norm CLIP image and text embeddings (the projected pooled outputs)."""

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu") -> ClipFeatures:
        """A local folder or hub id of a CLIP model, e.g. openai/clip-vit-large-patch14 (ViT-L/14)."""
        tf = _transformers()
        return cls(
            tf.CLIPModel.from_pretrained(name_or_path), tf.AutoProcessor.from_pretrained(name_or_path), device
        )

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors; texts longer than the model's context are truncated."""
        max_length = self.model.config.text_config.max_position_embeddings

        def embed(chunk: Sequence[str]) -> torch.Tensor:
            tokens = self.processor(
                text=list(chunk), return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            return self.model.text_projection(self.model.text_model(**tokens).pooler_output)

        return self._batched(texts, embed)


class DinoFeatures(_ImageEmbedder):
    """Unit-norm DINO embeddings: the CLS token of the last hidden layer (e.g. facebook/dino-vits16)."""

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu") -> DinoFeatures:
        tf = _transformers()
        return cls(
            tf.AutoModel.from_pretrained(name_or_path),
            tf.AutoImageProcessor.from_pretrained(name_or_path),
            device,
        )

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


# --------------------------------------------------------------------------------------------------
# Similarities
# --------------------------------------------------------------------------------------------------


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) cosine of row i of a with row i of b."""
    if a.shape != b.shape:
        raise ValueError(f"paired features must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every (row of a, row of b) pair (DreamBooth's subject-fidelity average)."""
    return float((F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean())


def clip_i(clip: ClipFeatures, outputs: Sequence[Any], references: Sequence[Any]) -> list[float]:
    """CLIP-I per pair: cosine of the CLIP image embeddings of output i and reference i."""
    return paired_cosine(clip.images(outputs), clip.images(references)).tolist()


def clip_t(clip: ClipFeatures, outputs: Sequence[Any], texts: Sequence[str]) -> list[float]:
    """CLIP-T per pair: cosine of the CLIP embeddings of output i and text i."""
    return paired_cosine(clip.images(outputs), clip.texts(texts)).tolist()


def dino(model: DinoFeatures, outputs: Sequence[Any], references: Sequence[Any]) -> list[float]:
    """DINO per pair: cosine of the DINO CLS embeddings of output i and reference i."""
    return paired_cosine(model.images(outputs), model.images(references)).tolist()


# --------------------------------------------------------------------------------------------------
# Edges (Canny F1)
# --------------------------------------------------------------------------------------------------


def canny_edges(image: Any, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """(H, W) bool edge map by OpenCV Canny on the 8-bit colour image (ControlNet++ 'canny_cv2'). OpenCV
    takes, per pixel, the channel with the largest gradient, so RGB and BGR give the same map."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError("the Canny metric needs OpenCV: pip install opencv-python-headless") from err
    array = np.ascontiguousarray(
        np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    )
    if array.dtype != np.uint8:
        raise TypeError(f"canny_edges needs a uint8 image, got {array.dtype}")
    return cv2.Canny(array, low, high) > 0


def binary_f1(pred: np.ndarray, target: np.ndarray, zero_division: float = 0.0) -> float:
    """F1 of the positive class over all elements (torchmetrics BinaryF1Score: 0 when nothing is
    predicted or present)."""
    pred, target = np.asarray(pred).astype(bool).ravel(), np.asarray(target).astype(bool).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target sizes differ: {pred.size} vs {target.size}")
    tp = int((pred & target).sum())
    denominator = int(pred.sum()) + int(target.sum())
    return zero_division if denominator == 0 else 2 * tp / denominator


def canny_f1(outputs: Sequence[Any], condition: np.ndarray) -> float:
    """F1 of one condition: the edges of every output image against the condition's edge map, pooled over
    the outputs (ControlNet++ scores a condition's 4 images as one flattened batch)."""
    target = np.asarray(condition).astype(bool)
    preds = [canny_edges(image) for image in outputs]
    for pred in preds:
        if pred.shape != target.shape:
            raise ValueError(f"output edge map {pred.shape} differs from the condition {target.shape}")
    return binary_f1(np.stack(preds), np.stack([target] * len(preds)))


# --------------------------------------------------------------------------------------------------
# SSIM / MS-SSIM (HED)
# --------------------------------------------------------------------------------------------------


def _gaussian_window(kernel_size: int, sigma: float, channels: int) -> torch.Tensor:
    dist = torch.arange((1 - kernel_size) / 2, (1 + kernel_size) / 2, 1.0, dtype=torch.float64)
    gauss = torch.exp(-((dist / sigma) ** 2) / 2)
    gauss = gauss / gauss.sum()
    return (gauss[:, None] @ gauss[None, :]).expand(channels, 1, kernel_size, kernel_size).contiguous()


def _ssim_and_cs(
    x: torch.Tensor, y: torch.Tensor, data_range: float, kernel_size: int, sigma: float, k1: float, k2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM (over the reflect-padded map) and contrast-sensitivity (over the unpadded area),
    as torchmetrics computes them; x, y (B, C, H, W)."""
    channels = x.shape[1]
    pad = (kernel_size - 1) // 2
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    window = _gaussian_window(kernel_size, sigma, channels).to(x)
    stacked = torch.cat([x, y, x * x, y * y, x * y])
    stacked = F.pad(stacked, (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(stacked, window, groups=channels).chunk(5)
    var_x = (xx - mu_x**2).clamp(min=0)
    var_y = (yy - mu_y**2).clamp(min=0)
    cov = xy - mu_x * mu_y
    upper, lower = 2 * cov + c2, var_x + var_y + c2
    ssim_map = ((2 * mu_x * mu_y + c1) * upper) / ((mu_x**2 + mu_y**2 + c1) * lower)
    cs_map = upper / lower
    crop = (slice(None), slice(None), slice(pad, -pad), slice(pad, -pad))  # torchmetrics crops cs only
    return ssim_map.flatten(1).mean(1), cs_map[crop].flatten(1).mean(1)


def _as_batch(image: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(image), dtype=torch.float64)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(t.shape)}")
    return t


def ssim(
    x: Any,
    y: Any,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """(B,) SSIM with a Gaussian window (Wang et al. 2004; torchmetrics' defaults and border handling)."""
    return _ssim_and_cs(_as_batch(x), _as_batch(y), data_range, kernel_size, sigma, k1, k2)[0]


def ms_ssim(
    x: Any,
    y: Any,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    betas: Sequence[float] = MS_SSIM_BETAS,
) -> torch.Tensor:
    """(B,) multi-scale SSIM as torchmetrics computes it (normalize="relu"): contrast-sensitivity at every
    scale but the last, SSIM at the last, each to its beta, images halved by 2x2 average pooling."""
    x, y = _as_batch(x), _as_batch(y)
    if x.shape != y.shape:
        raise ValueError(f"images must have equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    divisor = max(1, len(betas) - 1) ** 2
    if min(x.shape[-2:]) // divisor <= kernel_size - 1:
        raise ValueError(
            f"MS-SSIM with {len(betas)} scales and kernel {kernel_size} needs sides > "
            f"{(kernel_size - 1) * divisor}, "
            f"got {tuple(x.shape[-2:])}"
        )
    factors = []
    for scale in range(len(betas)):
        sim, cs = _ssim_and_cs(x, y, data_range, kernel_size, sigma, k1, k2)
        factors.append(torch.relu(sim if scale == len(betas) - 1 else cs))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    weights = torch.tensor(list(betas), dtype=torch.float64)[:, None]
    return torch.prod(torch.stack(factors) ** weights, dim=0)


def to_unit_gray(image: Any) -> np.ndarray:
    """(H, W) float in [0, 1] from a PIL image (converted to 'L') or a uint8/float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    if array.ndim == 3:
        array = np.asarray(Image.fromarray(array.astype(np.uint8)).convert("L"))
    return array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)


def hed_ssim(outputs_hed: Sequence[Any], condition_hed: Any) -> float:
    """Mean MS-SSIM of each output's HED map against the condition's HED map, maps read as 'L' in [0, 1]."""
    target = to_unit_gray(condition_hed)
    values = [float(ms_ssim(to_unit_gray(pred), target)[0]) for pred in outputs_hed]
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------------
# Depth (RMSE) and segmentation (mIoU)
# --------------------------------------------------------------------------------------------------


def depth_prediction_to_uint8(depth: Any, size: tuple[int, int]) -> np.ndarray:
    """A predicted depth map (H', W') as ControlNet++ saves it: divided by its maximum, scaled to 0-255
    (truncated), resized bilinearly to size = (width, height)."""
    d = np.asarray(depth, dtype=np.float64)
    peak = d.max()
    scaled = d / peak if peak > 0 else np.zeros_like(d)
    u8 = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(u8, "L").resize(size, Image.BILINEAR))


def depth_label_to_uint8(label: Any, size: tuple[int, int]) -> np.ndarray:
    """The condition depth map as ControlNet++ stores its label: min-max scaled to 0-255 (truncated),
    resized with nearest neighbour, read as 'L'."""
    array = np.asarray(label.convert("RGB") if isinstance(label, Image.Image) else label, dtype=np.float64)
    low, high = array.min(), array.max()
    scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
    image = Image.fromarray(scaled.astype(np.uint8))
    return np.asarray(image.resize(size, Image.NEAREST).convert("L"))


def rmse(pred: Any, target: Any) -> float:
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: {p.shape} vs {t.shape}")
    return float(np.sqrt(((p - t) ** 2).mean()))


class SegmentationIoU:
    """Data-set mIoU as mmseg's IoUMetric: per-class intersections and unions summed over all images,
    IoU = intersection / union per class, mIoU = mean over classes with a non-empty union.

    `reduce_zero_label` (ADE20K): label 0 ("other") is ignored and labels 1..K become 0..K-1.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)
        self.label_area = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: Any, label: Any) -> None:
        pred, label = np.asarray(pred).astype(np.int64), np.asarray(label).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ")
        if self.reduce_zero_label:
            label = np.where(label == 0, 255, label - 1)
            label = np.where(label == 254, 255, label)
        keep = (label != self.ignore_index) & (label >= 0) & (label < self.num_classes)
        pred, label = pred[keep], label[keep]
        in_range = (pred >= 0) & (pred < self.num_classes)
        k = self.num_classes
        area_pred = np.bincount(pred[in_range], minlength=k)[:k]
        area_label = np.bincount(label, minlength=k)[:k]
        area_inter = np.bincount(label[pred == label], minlength=k)[:k]
        self.intersection += area_inter
        self.union += area_pred + area_label - area_inter
        self.label_area += area_label

    def compute(self) -> dict[str, Any]:
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = self.intersection / self.union
            acc = self.intersection.sum() / self.label_area.sum()
        valid = self.union > 0
        return {
            "miou": float(np.nanmean(iou[valid])) if valid.any() else float("nan"),
            "pixel_accuracy": float(acc),
            "iou_per_class": [None if not v else float(x) for x, v in zip(iou, valid)],
        }
