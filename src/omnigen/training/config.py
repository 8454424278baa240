"""Training configuration: a validated dataclass read from YAML or TOML; unknown keys are rejected."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnigen.text.tokenizer import embedding_rows
from omnigen.util.checks import check_int
from omnigen.util.typecheck import check_fields, load_yaml

if TYPE_CHECKING:
    from omnigen.config import OmniGenConfig


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

    resolution: int
    steps: int
    batch_size: int
    lr: float

    def __post_init__(self) -> None:
        check_fields(self, prefix="stage ")
        for name in ("resolution", "steps", "batch_size"):
            check_int(f"stage {name}", getattr(self, name), 1)
        if not self.lr > 0:
            raise ValueError(f"stage lr must be positive, got {self.lr!r}")


@dataclass(frozen=True)
class LoraSettings:
    """``lora:`` of a run: LoRA adapters instead of a full fine-tune (``omnigen.weights.lora.add_lora``)."""

    rank: int
    alpha: float | None = None  # the scale is alpha / rank; None: alpha = rank (scale 1)
    target_modules: tuple[str, ...] = field(default_factory=lambda: _default_lora_targets())
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_fields(self, prefix="lora.")
        check_int("lora.rank", self.rank, 1)
        if self.alpha is None:
            object.__setattr__(self, "alpha", self.rank)
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
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
    """Every field of ``omnigen train --config FILE``; ``omnigen train --help`` prints them."""

    data: list[str | dict] = field(metadata={"help": "JSONL files/globs, shard patterns, {shards, weight}"})
    out_dir: str = field(metadata={"help": "run folder: checkpoints/, final/ and train.log"})
    stages: list[Stage] = field(metadata={"help": "list of {resolution, steps, batch_size, lr}"})
    model: dict = field(
        default_factory=dict, metadata={"help": "OmniGenConfig as a Phi-3 style dict (new model)"}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "model folder to fine-tune instead of `model`"}
    )
    grow_layers: int | None = field(
        default=None,
        metadata={"help": "with init_from: deepen to N layers, new ones the identity (training.grow)"},
    )
    grow_intermediate: int | None = field(
        default=None,
        metadata={"help": "with init_from: widen every MLP to N units, new ones silent (training.grow)"},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.json (default: init_from's)"})
    add_words: list[str] = field(
        default_factory=list, metadata={"help": "new words for the tokenizer (training.vocabulary)"}
    )
    extend_tokenizer: bool = field(
        default=False, metadata={"help": "add every word of the data the tokenizer does not know"}
    )
    codec: str = field(default="identity", metadata={"help": "'identity' (pixel space) or a VAE folder"})
    image_root: str | None = field(default=None, metadata={"help": "base folder for relative image paths"})
    on_bad_row: str = field(default="error", metadata={"help": "'error' or 'skip' bad JSONL rows"})
    check_images: str = field(
        default="verify",
        metadata={
            "help": "at load: 'verify' opens every image (PIL verify), 'exists' only checks the files are "
            "there (much faster on large sets; a corrupt image then fails when first read)"
        },
    )
    keep_raw_resolution: bool = field(
        default=False,
        metadata={
            "help": "keep aspect ratios: a target goes to the nearest bucket of <= resolution**2 pixels "
            "(batches share a bucket), inputs are fitted as at inference (long side <= resolution)"
        },
    )
    latent_cache: str | None = field(
        default=None,
        metadata={"help": "folder caching the codec's latents of every image (filled on first use)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of init, data order, noise, t and dropout"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (only on >= 2-D weights)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warm-up steps"})
    schedule: str = field(default="constant", metadata={"help": "'constant' or 'cosine' after warm-up"})
    length_groups: int = field(
        default=1,
        metadata={
            "help": "sort each run of this many batches' samples by sequence length before batching "
            "(less padding, same samples per epoch; 1 = off)"
        },
    )
    max_tokens: int | None = field(default=None, metadata={"help": "pack rows of <= N tokens (null: pad)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    clip_grad: float = field(default=1.0, metadata={"help": "max grad norm (0 = off)"})
    ema_decay: float = field(
        default=0.999,
        metadata={"help": "EMA decay (0 = no EMA), warmed up: min(ema_decay, (1 + s) / (10 + s)) at step s"},
    )
    skip_nonfinite_loss: bool = field(
        default=False, metadata={"help": "skip a step whose loss is NaN/inf (default: stop the run)"}
    )
    precision: str = field(default="fp32", metadata={"help": "'fp32', 'bf16' or 'fp16' autocast"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute layers in backward"})
    t_distribution: str = field(default="logit_normal", metadata={"help": "'uniform' or 'logit_normal'"})
    drop_text: float = field(default=0.05, metadata={"help": "P(drop the text, keep images) for CFG"})
    drop_images: float = field(default=0.05, metadata={"help": "P(drop the images, keep text)"})
    drop_both: float = field(default=0.05, metadata={"help": "P(drop everything)"})
    edit_weight: float = field(default=1.0, metadata={"help": "loss weight where an edit changes the input"})
    edit_threshold: float = field(default=0.1, metadata={"help": "latent difference counted as changed"})
    foreground_weight: float = field(
        default=1.0, metadata={"help": "loss weight where the target differs from its own background"}
    )
    foreground_threshold: float = field(
        default=0.1, metadata={"help": "latent distance to the background counted as foreground"}
    )
    foreground_dilate: int = field(default=0, metadata={"help": "grow the foreground by this many pixels"})
    log_every: int = field(default=50, metadata={"help": "steps between log lines"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    distributed: str = field(default="ddp", metadata={"help": "'ddp' or 'fsdp' under torchrun"})
    lora: LoraSettings | None = field(
        default=None,
        metadata={
            "help": "LoRA instead of a full fine-tune: {rank, alpha (default rank), target_modules (default "
            "the attention and MLP projections), dropout (default 0)}"
        },
    )
    val_data: list[str] | None = field(
        default=None,
        metadata={"help": "held-out X2I JSONL file(s): velocity loss at fixed draws, logged to val.jsonl"},
    )
    val_every: int = field(default=0, metadata={"help": "steps between validations (0: checkpoint_every)"})
    val_samples: int = field(default=256, metadata={"help": "validate on the first N val_data rows"})
    generation: dict = field(
        default_factory=dict,
        metadata={
            "help": "omnigen_generation.json of the result: fields of omnigen.generation.GenerationConfig"
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        choices = {
            "on_bad_row": ("error", "skip"),
            "check_images": ("verify", "exists"),
            "schedule": ("constant", "cosine"),
            "precision": ("fp32", "bf16", "fp16"),
            "t_distribution": ("uniform", "logit_normal"),
            "distributed": ("ddp", "fsdp"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.stages:
            raise ValueError("stages must list at least one {resolution, steps, batch_size, lr}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.model and not self.init_from:
            raise ValueError("give either `model` (a new model's config) or `init_from` (a model folder)")
        if self.lora is not None and not isinstance(self.lora, LoraSettings):
            raise ValueError(
                f"lora must be LoraSettings (from_dict builds it from a mapping), got {self.lora!r}"
            )
        for name in ("edit_weight", "foreground_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not all(isinstance(w, str) and w.strip() and len(w.split()) == 1 for w in self.add_words):
            raise ValueError(f"add_words must be a list of single words, got {self.add_words!r}")
        if self.lora is not None and (self.add_words or self.extend_tokenizer):
            raise ValueError(
                "add_words / extend_tokenizer train new embedding rows: a full fine-tune, not lora"
            )
        check_int("foreground_dilate", self.foreground_dilate, 0)
        check_int("length_groups", self.length_groups, 1)
        check_int("max_tokens", 1 if self.max_tokens is None else self.max_tokens, 1)
        check_int("val_every", self.val_every, 0)
        check_int("val_samples", self.val_samples, 1)
        if self.grow_layers is not None:
            if not self.init_from:
                raise ValueError("grow_layers deepens a trained model: it needs `init_from`")
            check_int("grow_layers", self.grow_layers, 1)
        if self.grow_intermediate is not None:
            if not self.init_from:
                raise ValueError("grow_intermediate widens a trained model: it needs `init_from`")
            check_int("grow_intermediate", self.grow_intermediate, 1)
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

    def model_config(self) -> OmniGenConfig:
        """The trained model's architecture: ``init_from``'s config (the model the trainer loads; with
        ``grow_layers`` that many layers), else ``model``."""
        from dataclasses import replace

        from omnigen.config import OmniGenConfig
        from omnigen.weights.checkpoint import load_config, resolve_layout

        if self.init_from:
            config = load_config(resolve_layout(self.init_from))
            if self.grow_layers is not None:
                config = replace(config, transformer=replace(config.transformer, num_layers=self.grow_layers))
            if self.grow_intermediate is not None:
                size = self.grow_intermediate
                config = replace(config, transformer=replace(config.transformer, intermediate_size=size))
            change = self.vocabulary_change()
            if change is not None:  # the trainer remaps the token embedding (training.grow)
                size = embedding_rows(change[1])
                config = replace(config, transformer=replace(config.transformer, vocab_size=size))
            return config
        return OmniGenConfig.from_dict(self.model)

    def vocabulary_change(self) -> tuple[dict[str, int], dict[str, int]] | None:
        """With ``init_from`` and a ``tokenizer`` whose vocabulary differs from the base model's: (base
        vocabulary, new vocabulary), the trainer remapping the token embedding from one to the other;
        else None (also when the base folder has no tokenizer: its ids are then taken as ``tokenizer``'s)."""
        if not (self.init_from and (self.tokenizer or self.add_words or self.extend_tokenizer)):
            return None
        from omnigen.text.tokenizer import Tokenizer
        from omnigen.training.vocabulary import run_tokenizer
        from omnigen.weights.checkpoint import resolve_layout

        base_file = resolve_layout(self.init_from).tokenizer_dir / "tokenizer.json"
        if not base_file.is_file():
            return None
        old, new = Tokenizer.from_file(base_file).backend.get_vocab(), run_tokenizer(self).backend.get_vocab()
        return None if new == old else (old, new)

    def tokenizer_file(self) -> str:
        """The tokenizer.json the run trains with: ``tokenizer``, or ``init_from``'s."""
        if self.tokenizer is not None:
            return self.tokenizer
        if not self.init_from:
            raise ValueError("a new model needs `tokenizer` (a tokenizer.json)")
        from omnigen.weights.checkpoint import resolve_layout

        return str(resolve_layout(self.init_from).tokenizer_dir / "tokenizer.json")

    def check_paths(self) -> None:
        """ValueError if a ``data``, ``val_data`` or ``tokenizer`` file (or glob) is not there, saying how
        to make it; called before a run starts, so a missing data set fails before any model is built."""
        import glob

        from omnigen.training.stream import parse_sources

        jsonl = parse_sources(self.data)[0]  # a shard pattern that matches nothing fails here
        named = [("data", p) for p in jsonl] + [("val_data", p) for p in self.val_data or []]
        if self.tokenizer is not None:
            named.append(("tokenizer", self.tokenizer))
        for name, path in named:
            if glob.has_magic(path) and any(Path(m).is_file() for m in glob.glob(path, recursive=True)):
                continue
            if not glob.has_magic(path) and Path(path).is_file():
                continue
            folder = Path(path).parent if not glob.has_magic(path) else Path(path.split("*")[0]).parent
            split = " --split heldout" if name == "val_data" else ""
            raise ValueError(
                f"{name}: {path} does not exist. Make the data set first, e.g. the miniature world: "
                f"`omnigen data miniworld --out {folder} --n N{split}` (it writes SPLIT.jsonl, its images and "
                "tokenizer.json there); the comment at the top of the shipped configs gives their commands"
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
