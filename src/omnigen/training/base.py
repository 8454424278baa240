"""What a run starts from, read once from the files its ``TrainConfig`` names (the config itself is plain
data): ``check_paths`` (the data and tokenizer files are there) and ``resolve_base`` (``init_from``'s folder
layout, its config and tokenizer, the run's tokenizer, the vocabulary change between them, and the
architecture the run trains). The trainer calls each once per run and passes the result on."""

from __future__ import annotations

import glob
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from omnigen.config import OmniGenConfig
from omnigen.text.tokenizer import Tokenizer, embedding_rows
from omnigen.training import vocabulary
from omnigen.training.batches import read_samples
from omnigen.training.config import TrainConfig
from omnigen.training.stream import parse_sources
from omnigen.weights.checkpoint import Layout, load_config, resolve_layout

if TYPE_CHECKING:
    from omnigen.training.x2i import X2ISample

Vocabularies = tuple[dict[str, int], dict[str, int]]


@dataclass(frozen=True)
class BaseModel:
    """The resolved start of a run. ``model_config`` is the architecture trained: ``init_from``'s config
    (``folder_config``) deepened to ``grow_layers``, widened to ``grow_intermediate`` and with the token
    embedding resized to the new vocabulary; or the config's ``model`` for a new model (``layout`` None)."""

    model_config: OmniGenConfig
    tokenizer: Tokenizer
    tokenizer_file: str
    layout: Layout | None = None
    folder_config: OmniGenConfig | None = None
    # (base vocabulary, new vocabulary) when ``tokenizer`` differs from init_from's own: the trainer
    # remaps the token embedding from one to the other (omnigen.training.grow); else None (also when the
    # base folder has no tokenizer: its ids are then taken as ``tokenizer``'s)
    vocabulary_change: Vocabularies | None = None
    # the run's JSONL samples when reading the tokenizer's new words read them (``extend_tokenizer``):
    # the batch builder takes these instead of reading the data again; else None (it reads them)
    samples: list[X2ISample] | None = None


def resolve_base(config: TrainConfig) -> BaseModel:
    """Read ``init_from`` (layout, config.json, tokenizer), the run's tokenizer and, with
    ``extend_tokenizer``, the JSONL samples once; ValueError, before any model is built, when the
    tokenizer has ids the model's token embedding lacks."""
    samples = None
    if config.extend_tokenizer:
        if parse_sources(config.data)[1]:
            raise ValueError(
                "extend_tokenizer reads the words of JSONL data; list new words in add_words instead"
            )
        samples = read_samples(config)
    if not config.init_from:
        if config.tokenizer is None:
            raise ValueError("a new model needs `tokenizer` (a tokenizer.json)")
        tokenizer = vocabulary.extend(
            Tokenizer.from_file(config.tokenizer), config, config.tokenizer, samples or ()
        )
        base = BaseModel(OmniGenConfig.from_dict(config.model), tokenizer, config.tokenizer, samples=samples)
    else:
        layout = resolve_layout(config.init_from)
        folder_config = load_config(layout)
        base_file = layout.tokenizer_dir / "tokenizer.json"
        tokenizer_file = config.tokenizer or str(base_file)
        read = Tokenizer.from_file(tokenizer_file)
        tokenizer = vocabulary.extend(read, config, tokenizer_file, samples or ())
        change = None
        if base_file.is_file():  # the base's ids -> the run's (another tokenizer, or new words)
            same = config.tokenizer is None or _same_file(config.tokenizer, base_file)
            old = (read if same else Tokenizer.from_file(base_file)).backend.get_vocab()
            new = tokenizer.backend.get_vocab()
            change = None if new == old else (old, new)
        model_config = _trained_config(folder_config, config, change)
        base = BaseModel(model_config, tokenizer, tokenizer_file, layout, folder_config, change, samples)
    needed = embedding_rows(base.tokenizer.backend.get_vocab())
    rows = base.model_config.transformer.vocab_size
    if needed > rows:
        raise ValueError(
            f"the tokenizer {base.tokenizer_file} has {needed} token ids but the model's vocabulary "
            f"holds {rows}: set model.vocab_size to at least {needed}"
        )
    return base


def _trained_config(folder_config: OmniGenConfig, config: TrainConfig, change: Vocabularies | None):
    shape = folder_config.transformer
    if config.grow_layers is not None:
        shape = replace(shape, num_layers=config.grow_layers)
    if config.grow_intermediate is not None:
        shape = replace(shape, intermediate_size=config.grow_intermediate)
    if change is not None:
        shape = replace(shape, vocab_size=embedding_rows(change[1]))
    return replace(folder_config, transformer=shape)


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_paths(config: TrainConfig) -> None:
    """ValueError if a ``data``, ``val_data`` or ``tokenizer`` file (or glob) is not there, saying how to
    make it; called before a run starts, so a missing data set fails before any model is built."""
    jsonl = parse_sources(config.data)[0]  # a shard pattern that matches nothing fails here
    named = [("data", p) for p in jsonl] + [("val_data", p) for p in config.val_data or []]
    if config.tokenizer is not None:
        named.append(("tokenizer", config.tokenizer))
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
