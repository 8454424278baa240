"""Teaching a fine-tune new words. The run's tokenizer is the one it names (``tokenizer``, else
``init_from``'s) extended with ``add_words`` and, with ``extend_tokenizer``, with every word of the training
instructions that it maps to its unknown token. Each new word gets the next free id (a token matched as a
whole word), so the ids the base model knows are unchanged; the trainer then grows the token embedding
(``grow.remap_vocabulary``: a new row starts at the mean of the existing ones) and trains it, and the
exported folder carries the extended tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from omnigen.text.tags import BARE_TAG_PATTERN
from omnigen.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from omnigen.training.config import TrainConfig
    from omnigen.training.x2i import X2ISample

logger = logging.getLogger(__name__)


def extend(
    tokenizer: Tokenizer, config: TrainConfig, source: str, samples: Sequence[X2ISample] = ()
) -> Tokenizer:
    """``tokenizer`` (read from ``source``) with the run's ``add_words`` and, with ``extend_tokenizer``,
    every word of ``samples`` (the run's JSONL data, read once: ``batches.read_samples``) the tokenizer
    does not know; itself when there are none."""
    new_words = unknown_words(tokenizer, samples) if config.extend_tokenizer else []
    words = list(dict.fromkeys([*config.add_words, *new_words]))
    if not words:
        return tokenizer
    extended = tokenizer.with_words(words)
    added = extended.backend.get_vocab_size() - tokenizer.backend.get_vocab_size()
    logger.info("extended the tokenizer %s with %d new words: %s", source, added, ", ".join(words[:20]))
    return extended


def unknown_words(tokenizer: Tokenizer, samples: Sequence[X2ISample]) -> list[str]:
    """The words of the samples' instructions (few-shot examples included) ``tokenizer`` does not know."""
    from omnigen.text.processor import apply_template
    from omnigen.training.x2i import compose_instruction

    words: dict[str, None] = {}
    for sample in samples:  # the text chunks the processor encodes
        text = apply_template(compose_instruction(sample)[0])
        for chunk in BARE_TAG_PATTERN.split(text)[::2]:
            words.update(dict.fromkeys(tokenizer.unknown_words(chunk)))
    return list(words)
