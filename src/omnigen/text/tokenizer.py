"""Text tokenizer over the HF ``tokenizers`` library: tokenizer.json plus the flags of tokenizer_config.json.

The contract: for a folder's own files, ``Tokenizer.from_file(folder).encode(text)`` gives the ids of
``transformers.AutoTokenizer.from_pretrained(folder)(text).input_ids`` under transformers 4.x (4.45 is the
original OmniGen's pin, so these are the ids OmniGen-v1 was trained on). transformers 4.x builds its fast
tokenizer from tokenizer.json as it is and then applies tokenizer_config.json (``apply_tokenizer_config``):

- every entry of ``added_tokens_decoder`` is registered again with its flags (``lstrip``, ``rstrip``,
  ``normalized``, ``single_word``, ``special``); a named special token (``bos_token``, ``eos_token``, ...)
  is special whatever its entry says, and one that is not an added token yet is added. Under Phi-3's
  config ``rstrip: true`` on ``<|user|>``, ``<|end|>`` and ``<|assistant|>`` eats the newline after them;
- the Llama-family classes (``tokenizer_class``) replace the post-processor by one that prepends
  ``bos_token`` when ``add_bos_token`` (default true) and appends ``eos_token`` when ``add_eos_token``
  (default false); other classes keep tokenizer.json's;
- ``legacy`` only changes how a slow (sentencepiece) tokenizer is converted: a tokenizer.json is used as
  it is, so the flag changes nothing here.

transformers 5 rebuilds Llama-class tokenizers from the vocabulary with its own Metaspace pre-tokenizer
instead of tokenizer.json's normalizer, which changes the ids of Phi-3's file (no "▁" before the first word
after a special token, fewer "▁" for leading spaces); we keep 4.x's ids, the ones the model saw.
A folder without tokenizer_config.json is read as tokenizer.json alone.

The shipped miniature model uses a small WordLevel tokenizer: a word outside its vocabulary becomes the
unknown token, and ``encode`` logs a warning naming it (once per word).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# tokenizer classes whose fast tokenizer sets a bos/eos post-processor, with (add_bos, add_eos) defaults
POST_PROCESSOR_DEFAULTS = {
    "LlamaTokenizer": (True, False),
    "CodeLlamaTokenizer": (True, False),
    "GemmaTokenizer": (True, False),
    "CohereTokenizer": (True, False),
    "GPTNeoXTokenizer": (False, False),
}

SIDECARS = (CONFIG_FILE, "special_tokens_map.json")  # kept beside tokenizer.json and written back by save


def embedding_rows(vocabulary: dict[str, int]) -> int:
    """The token-embedding rows a vocabulary (token -> id) needs: its largest id + 1 (ids may have gaps)."""
    return max(vocabulary.values()) + 1


class TextTokenizer(Protocol):
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


def _content(value: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def named_special_tokens(config: dict) -> list[str]:
    names = [_content(config.get(key)) for key in NAMED_SPECIAL]
    names += [_content(t) for t in config.get("additional_special_tokens") or []]
    return [name for name in dict.fromkeys(names) if name]


def apply_tokenizer_config(backend, config: dict) -> None:  # tokenizers.Tokenizer
    """Apply tokenizer_config.json's added-token flags and bos/eos post-processor to ``backend`` in place,
    as transformers 4.x's fast tokenizers do (see the module docstring)."""
    from tokenizers import AddedToken, processors

    named = named_special_tokens(config)
    decoder = config.get("added_tokens_decoder") or {}
    tokens = []
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        token = AddedToken(entry["content"], **{k: bool(entry[k]) for k in FLAGS if k in entry})
        if entry["content"] in named:
            token.special = True
        tokens.append(token)
    known = {t.content for t in tokens} | {t.content for t in backend.get_added_tokens_decoder().values()}
    tokens += [AddedToken(name, special=True) for name in named if name not in known]
    if tokens:
        backend.add_tokens(tokens)

    class_name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if class_name not in POST_PROCESSOR_DEFAULTS:
        return
    default_bos, default_eos = POST_PROCESSOR_DEFAULTS[class_name]
    bos = _end_token(backend, config, "bos_token", "<s>") if config.get("add_bos_token", default_bos) else []
    eos = _end_token(backend, config, "eos_token", "</s>") if config.get("add_eos_token", default_eos) else []
    single = " ".join([f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos])
    pair = " ".join([single] + [f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(bos + eos))
    )


def _end_token(backend, config: dict, key: str, default: str) -> list[tuple[str, int]]:
    token = _content(config.get(key)) or default
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(
            f"tokenizer_config.json sets add_{key} but its {key} {token!r} is not in the vocabulary"
        )
    return [(token, token_id)]


class Tokenizer:
    """``encode`` returns the ids with the tokenizer's own special tokens (BOS for OmniGen-v1's)."""

    def __init__(
        self,
        backend,  # tokenizers.Tokenizer, imported lazily
        bos_token: str = "<s>",
        unk_token: str | None = None,
        sidecars: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.bos_token_id = backend.token_to_id(bos_token)
        unk = unk_token or getattr(backend.model, "unk_token", None) or "<unk>"
        self.unk_token_id = backend.token_to_id(unk)
        self._warned: set[str] = set()
        # the texts of tokenizer_config.json / special_tokens_map.json read beside tokenizer.json, written
        # back unchanged by ``save`` (transformers' AutoTokenizer reads its flags from them)
        self.sidecars = dict(sidecars or {})

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A folder (or its tokenizer.json): tokenizer.json plus the tokenizer_config.json beside it."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            if (folder / "tokenizer.model").is_file():
                raise ValueError(
                    f"{folder} has a sentencepiece tokenizer.model but no {TOKENIZER_FILE}; this loader reads "
                    f"only {TOKENIZER_FILE} (+ {CONFIG_FILE}). Convert it once where transformers and "
                    "sentencepiece are installed: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
                )
            raise ValueError(f"tokenizer file not found: {path}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # the backend raises a bare Exception on bad JSON
            raise ValueError(f"cannot read tokenizer {path}: {err}") from err
        sidecars = {name: (folder / name).read_text() for name in SIDECARS if (folder / name).is_file()}
        config = json.loads(sidecars[CONFIG_FILE]) if CONFIG_FILE in sidecars else {}
        apply_tokenizer_config(backend, config)
        return cls(
            backend,
            bos_token=_content(config.get("bos_token")) or "<s>",
            unk_token=_content(config.get("unk_token")),
            sidecars=sidecars,
        )

    def encode(self, text: str) -> list[int]:
        encoding = self.backend.encode(text, add_special_tokens=True)
        if self.unk_token_id is not None and self.unk_token_id in encoding.ids:
            self._warn_unknown(text, encoding)
        return encoding.ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` this tokenizer maps to its unknown token, in order, each once."""
        if self.unk_token_id is None:
            return []
        return self._unknown(text, self.backend.encode(text, add_special_tokens=True))

    def _unknown(self, text: str, encoding) -> list[str]:  # tokenizers.Encoding
        words = [
            text[start:end]
            for token_id, (start, end), special in zip(
                encoding.ids, encoding.offsets, encoding.special_tokens_mask, strict=True
            )
            if token_id == self.unk_token_id and not special and end > start
        ]
        return list(dict.fromkeys(words))

    def with_words(self, words: list[str]) -> Tokenizer:
        """A copy that knows ``words`` too: each one the vocabulary lacks becomes a token of its own (the
        next free id, matched as a whole word after the tokenizer's normalizer); known ids are unchanged."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(self.backend.to_str())
        normalize = backend.normalizer.normalize_str if backend.normalizer is not None else str
        new = [w for w in dict.fromkeys(normalize(word) for word in words) if backend.token_to_id(w) is None]
        tokens = [AddedToken(w, single_word=any(c.isalnum() for c in w), normalized=True) for w in new]
        backend.add_tokens(tokens)  # a word matches only as a whole word (punctuation anywhere)
        used = set(self.backend.get_vocab().values())
        clashes = [w for w in new if backend.token_to_id(w) in used]
        if clashes:
            raise ValueError(
                f"cannot add {clashes[:5]} to this tokenizer: its ids have gaps, so a new word would take an id "
                "a known token has; renumber the tokenizer's vocabulary first"
            )
        unk = None if self.unk_token_id is None else self.backend.id_to_token(self.unk_token_id)
        return Tokenizer(backend, self.bos_token, unk, self.sidecars)

    def _warn_unknown(self, text: str, encoding) -> None:  # tokenizers.Encoding
        new = [w for w in self._unknown(text, encoding) if w not in self._warned]
        if new:
            self._warned.update(new)
            logger.warning(
                "the tokenizer does not know %s: mapped to its unknown token %r, so the model cannot read it",
                ", ".join(repr(w) for w in new),
                self.backend.id_to_token(self.unk_token_id),
            )

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, folder: str | Path) -> None:
        """tokenizer.json plus tokenizer_config.json: the one read with it, else a minimal one that
        ``from_file`` and transformers' ``AutoTokenizer`` both load to the same ids."""
        folder = Path(folder)
        self.backend.save(str(folder / TOKENIZER_FILE))
        sidecars = dict(self.sidecars)
        if CONFIG_FILE not in sidecars:
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token}
            sidecars[CONFIG_FILE] = json.dumps(config, indent=1)
        for name, text in sidecars.items():
            (folder / name).write_text(text)
