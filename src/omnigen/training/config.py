"""Training configuration: a validated dataclass read from YAML or TOML; unknown keys are rejected."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from omnigen.util.checks import option, validate
from omnigen.util.typecheck import load_yaml


@dataclass(frozen=True)
class LossSettings:
    """How a batch's loss is weighted; ``TrainConfig.loss_settings()`` builds it from a run's config."""

    t_distribution: str = "logit_normal"
    edit_weight: float = 1.0
    edit_threshold: float = 0.1
    foreground_weight: float = 1.0
    foreground_threshold: float = 0.1
    foreground_dilate: int = 0


@dataclass(frozen=True)
class Stage:
    """One progressive-resolution stage (paper Table 1): square output images of ``resolution`` pixels, or
    with ``keep_raw_resolution`` aspect-ratio buckets of at most ``resolution**2`` pixels."""

    resolution: int = option(help="output side in pixels", low=1)
    steps: int = option(help="optimizer steps", low=1)
    batch_size: int = option(help="samples per optimizer step (per rank)", low=1)
    lr: float = option(help="learning rate", low=0, low_open=True)

    def __post_init__(self) -> None:
        validate(self, prefix="stage ")


@dataclass(frozen=True)
class LoraSettings:
    """``lora:`` of a run: LoRA adapters instead of a full fine-tune (``omnigen.weights.lora.add_lora``)."""

    rank: int = option(help="adapter rank", low=1)
    alpha: float | None = option(None, "the scale is alpha / rank; None: alpha = rank", low=0, low_open=True)
    target_modules: tuple[str, ...] = option(
        help="module names adapted", factory=lambda: _default_lora_targets()
    )
    dropout: float = option(0.0, "dropout on the adapter's input", low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        validate(self, prefix="lora.")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        if not self.target_modules:
            raise ValueError("lora.target_modules must be a non-empty list of names, got []")

    @classmethod
    def from_dict(cls, data: Any) -> LoraSettings:
        if isinstance(data, LoraSettings):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"lora must be a mapping {{rank, alpha, target_modules, dropout}}, got {data!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown lora keys {unknown}; allowed: {allowed}")
        if "rank" not in data:
            raise ValueError("lora needs `rank` (a positive int)")
        return cls(**data)

    def arguments(self) -> dict[str, Any]:
        """``omnigen.weights.lora.add_lora`` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TrainConfig:
    """Every field of ``omnigen train --config FILE``; ``omnigen train --help`` prints them. Plain data: the
    files it names are read by the trainer (``omnigen.training.base``)."""

    data: list[str | dict] = option(help="X2I JSONL files/globs, shard patterns, or [{shards, weight}, ...]")
    out_dir: str = option(help="run folder: checkpoints/, final/ and train.log")
    stages: list[Stage] = option(help="list of {resolution, steps, batch_size, lr}")
    model: dict = option(help="OmniGenConfig as a Phi-3 style dict (new model)", factory=dict)
    init_from: str | None = option(None, "model folder to fine-tune instead of `model`")
    grow_layers: int | None = option(
        None,
        "with init_from: deepen the loaded model to this many layers before training (new blocks "
        "interleaved, starting as the identity: omnigen.training.grow)",
        low=1,
    )
    grow_intermediate: int | None = option(
        None,
        "with init_from: widen every MLP to this many hidden units before training (new units start with "
        "zero output weights: omnigen.training.grow)",
        low=1,
    )
    data_workers: int = option(
        0,
        "with shards: each rank reads them in this many DataLoader worker processes (0: in the training "
        "process); every source needs >= ranks x data_workers shards",
        low=0,
    )
    tokenizer: str | None = option(None, "tokenizer.json (default: init_from's)")
    add_words: list[str] = option(
        help="new words for the tokenizer (omnigen.training.vocabulary)", factory=list
    )
    extend_tokenizer: bool = option(False, "add every word of the JSONL data the tokenizer does not know")
    codec: str = option("identity", "'identity' (pixel space) or a VAE folder")
    image_root: str | None = option(None, "base folder for relative image paths")
    on_bad_row: str = option("error", "'error' or 'skip' bad JSONL rows", choices=("error", "skip"))
    check_images: str = option(
        "verify",
        "at load: 'verify' opens every image (PIL verify), 'exists' only checks the files are there (much "
        "faster on large sets; a corrupt image then fails when first read)",
        choices=("verify", "exists"),
    )
    keep_raw_resolution: bool = option(
        False,
        "keep aspect ratios: a target goes to the nearest bucket of <= resolution**2 pixels (batches share "
        "a bucket), inputs are fitted as at inference (long side <= resolution)",
    )
    latent_cache: str | None = option(
        None, "folder caching the codec's latents of every image (filled on first use)"
    )
    seed: int = option(0, "seed of init, data order, noise, t and dropout", low=0)
    weight_decay: float = option(0.0, "AdamW weight decay (only on >= 2-D weights)", low=0)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    warmup_steps: int = option(0, "linear LR warm-up steps", low=0)
    schedule: str = option("constant", "'constant' or 'cosine' after warm-up", choices=("constant", "cosine"))
    length_groups: int = option(
        1,
        "sort each run of this many batches' samples by sequence length before batching (less padding, "
        "same samples per epoch; 1 = off)",
        low=1,
    )
    grad_accum: int = option(1, "micro-batches per optimizer step", low=1)
    clip_grad: float = option(1.0, "max grad norm (0 = off)", low=0)
    ema_decay: float = option(
        0.999,
        "EMA decay (0 = no EMA), warmed up: min(ema_decay, (1 + s) / (10 + s)) at update s",
        low=0,
        high=1,
        high_open=True,
    )
    skip_nonfinite_loss: bool = option(False, "skip a step whose loss is NaN/inf (default: stop the run)")
    max_tokens: int | None = option(None, "pack each micro-batch into rows of <= N tokens (null: pad)", low=1)
    precision: str = option("fp32", "'fp32', 'bf16' or 'fp16' autocast", choices=("fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = option(False, "recompute layers in backward")
    t_distribution: str = option(
        "logit_normal", "'uniform' or 'logit_normal'", choices=("uniform", "logit_normal")
    )
    drop_text: float = option(0.05, "P(drop the text, keep images) for CFG", low=0, high=1)
    drop_images: float = option(0.05, "P(drop the images, keep text)", low=0, high=1)
    drop_both: float = option(0.05, "P(drop everything)", low=0, high=1)
    edit_weight: float = option(1.0, "loss weight where an edit changes the input", low=0, low_open=True)
    edit_threshold: float = option(0.1, "latent difference counted as changed", low=0)
    foreground_weight: float = option(
        1.0, "loss weight where the target differs from its own background", low=0, low_open=True
    )
    foreground_threshold: float = option(
        0.1, "latent distance to the background counted as foreground", low=0
    )
    foreground_dilate: int = option(0, "grow the foreground by this many pixels", low=0)
    log_every: int = option(50, "steps between log lines", low=1)
    checkpoint_every: int = option(500, "steps between checkpoints", low=1)
    keep_checkpoints: int = option(2, "checkpoints kept on disk", low=1)
    distributed: str = option("ddp", "'ddp' or 'fsdp' under torchrun", choices=("ddp", "fsdp"))
    lora: LoraSettings | None = option(
        None,
        "LoRA instead of a full fine-tune: {rank, alpha (default rank), target_modules (default the "
        "attention and MLP projections), dropout (default 0)}",
    )
    val_data: list[str] | None = option(
        None, "held-out X2I JSONL file(s): velocity loss at fixed draws, logged to val.jsonl"
    )
    val_every: int = option(0, "steps between validations (0: checkpoint_every)", low=0)
    val_samples: int = option(256, "validate on the first N val_data rows", low=1)
    generation: dict = option(
        help="omnigen_generation.json of the result: fields of omnigen.generation.GenerationConfig",
        factory=dict,
    )

    def __post_init__(self) -> None:
        validate(self)
        if not self.stages:
            raise ValueError("stages must list at least one {resolution, steps, batch_size, lr}")
        if not self.model and not self.init_from:
            raise ValueError("give either `model` (a new model's config) or `init_from` (a model folder)")
        for name, verb in (("grow_layers", "deepens"), ("grow_intermediate", "widens")):
            if getattr(self, name) is not None and not self.init_from:
                raise ValueError(f"{name} {verb} a trained model: it needs `init_from`")
        if not all(isinstance(w, str) and w.strip() and len(w.split()) == 1 for w in self.add_words):
            raise ValueError(f"add_words must be a list of single words, got {self.add_words!r}")
        if self.lora is not None and (self.add_words or self.extend_tokenizer):
            raise ValueError(
                "add_words / extend_tokenizer train new embedding rows: a full fine-tune, not lora"
            )
        from omnigen.generation import GenerationConfig

        GenerationConfig.from_dict(self.generation, "generation")  # a bad key or value fails at load
        if self.latent_cache is not None and not self.latent_cache:
            raise ValueError(f"latent_cache must be a folder path or null, got {self.latent_cache!r}")

    def loss_settings(self) -> LossSettings:
        return LossSettings(
            self.t_distribution,
            self.edit_weight,
            self.edit_threshold,
            self.foreground_weight,
            self.foreground_threshold,
            self.foreground_dilate,
        )

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; allowed: {sorted(known)}")
        missing = [
            n
            for n, f in known.items()
            if f.default is MISSING and f.default_factory is MISSING and n not in data
        ]
        if missing:
            raise ValueError(f"training config is missing {missing}")
        values = dict(data)
        for name in ("data", "val_data"):
            if isinstance(values.get(name), str):
                values[name] = [values[name]]
        stages = []
        for index, stage in enumerate(values.get("stages") or []):
            if not isinstance(stage, dict) or set(stage) != {"resolution", "steps", "batch_size", "lr"}:
                raise ValueError(
                    f"stages[{index}] must have exactly resolution, steps, batch_size, lr; got {stage!r}"
                )
            stages.append(Stage(**stage))
        values["stages"] = stages
        if values.get("lora") is not None:
            values["lora"] = LoraSettings.from_dict(values["lora"])
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """YAML (.yaml/.yml) or TOML (.toml); ``overrides`` are ``key=value`` with JSON/YAML values."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {str(path)!r}: no such file")
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = load_yaml(text)
        else:
            raise ValueError(f"config file must end in .yaml, .yml or .toml, got {path.name}")
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping at the top level")
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like key=value")
            data[key.strip()] = load_yaml(value)
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _default_lora_targets() -> tuple[str, ...]:
    from omnigen.weights.lora import DEFAULT_TARGET_MODULES

    return DEFAULT_TARGET_MODULES
