"""Text tokenizer adapter over the HF ``tokenizers`` library (tokenizer.json), BOS handling included.

The OmniGen-v1 folder ships the Phi-3 tokenizer.json; the shipped miniature model ships its own small
WordLevel tokenizer.json. Both go through this one class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

CONFIG = "tokenizer_config.json"
SIDECARS = (CONFIG, "special_tokens_map.json")


class TextTokenizer(Protocol):
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


class Tokenizer:
    """``encode`` returns ids with BOS prepended when the tokenizer adds one (as the reference's does)."""

    def __init__(
        self,
        backend,  # noqa: ANN001 - tokenizers.Tokenizer, imported lazily
        add_bos: bool | None = None,
        bos_token: str = "<s>",
        sidecars: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = backend.token_to_id(bos_token)
        self.add_bos = add_bos
        self.bos_token = bos_token
        # The texts of tokenizer_config.json / special_tokens_map.json read beside tokenizer.json: written
        # back unchanged by ``save`` (transformers' AutoTokenizer reads flags from them).
        self.sidecars = dict(sidecars or {})

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Loads tokenizer.json; honours ``add_bos_token`` from a tokenizer_config.json beside it."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # the backend raises a bare Exception on bad JSON
            raise ValueError(f"cannot read tokenizer {path}: {err}") from err
        add_bos, bos_token = None, "<s>"
        sidecars = {
            name: path.with_name(name).read_text() for name in SIDECARS if path.with_name(name).is_file()
        }
        if CONFIG in sidecars:
            config = json.loads(sidecars[CONFIG])
            add_bos = config.get("add_bos_token")
            bos = config.get("bos_token")
            bos_token = bos.get("content", "<s>") if isinstance(bos, dict) else (bos or "<s>")
        return cls(backend, add_bos=add_bos, bos_token=bos_token, sidecars=sidecars)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=True).ids
        if self.add_bos is None or self.bos_token_id is None:
            return ids
        has_bos = bool(ids) and ids[0] == self.bos_token_id
        if self.add_bos and not has_bos:
            return [self.bos_token_id, *ids]
        if not self.add_bos and has_bos:
            return ids[1:]
        return ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, folder: str | Path) -> None:
        """tokenizer.json plus tokenizer_config.json: the one read with it, else a minimal one that
        ``from_file`` and transformers' ``AutoTokenizer`` both load to the same ids."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        sidecars = dict(self.sidecars)
        if CONFIG not in sidecars:
            config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token}
            if self.add_bos is not None:
                config["add_bos_token"] = self.add_bos
            sidecars[CONFIG] = json.dumps(config, indent=1)
        for name, text in sidecars.items():
            (folder / name).write_text(text)
