"""Tokenizer parity with transformers, on a Phi-3 shaped tokenizer built here.

The fixture is what OmniGen-v1's folder ships, in miniature: a byte-fallback BPE tokenizer.json whose
normalizer prepends "▁" and replaces spaces (Phi-3's), with Phi-3's added tokens, and a
tokenizer_config.json carrying Phi-3's flags (rstrip on <|user|>, <|end|>, <|assistant|>, <|system|> and
the placeholders; </s> rstrip and not special; add_bos_token; legacy false; LlamaTokenizer).

The reference is transformers 4.x's ``AutoTokenizer`` (4.45 is the original's pin). transformers 5
rebuilds Llama-class tokenizers with its own pre-tokenizer (see ``omnigen.text.tokenizer``), so under 5.x the
reference is 4.x's composition rebuilt from 5.x's parts (``reference_tokenizer``). When this test was
written, transformers 4.45.2's ``AutoTokenizer`` (in a separate environment) gave exactly our ids on
these strings and config variants (78 of 78), and 5.24's ``AutoTokenizer`` differed on 8 of the 13 strings.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from omnigen.generation import DEFAULT_NEGATIVE_PROMPT
from omnigen.pipeline import OmniGenPipeline
from omnigen.text.processor import ASSISTANT, END, PREAMBLE, USER, apply_template
from omnigen.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

PHI3_ADDED = [  # (content, id offset after the trained vocabulary, rstrip)
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
CORPUS = [
    "Generate an image according to the following instructions",
    "A curly-haired man in a red shirt is drinking tea.",
    DEFAULT_NEGATIVE_PROMPT,
    "Remove the woman's earrings. Replace the mug with a clear glass.",
    "The man is the man with a black jacket in the image, the woman is wearing red.",
    "Following the pose of this image, generate a new photo: a young boy is sitting on a sofa.",
]
TEXTS = [
    apply_template("A curly-haired man in a red shirt is drinking tea."),
    apply_template(DEFAULT_NEGATIVE_PROMPT),
    # the chunks the processor tokenises for an edit prompt (split at the image tags)
    f"{USER}{PREAMBLE}<img>",
    "</img> Remove the woman's earrings. Replace the mug with a clear glass.",
    f"</img> and <img>{END}{ASSISTANT}",
    "<img><|image_1|></img>",
    "a  man   in\t\tthe\n\n\nroom  ",
    "  leading spaces",
    " ",
    "",
    "Ünïcødé: 猫が座っている, émoji 🐱, Ελληνικά",
    "<|user|>   x <|end|>\n\nY<|end|><|end|> </s> x</s>y",
    "<|system|> be brief<|placeholder1|>p\r\n<|endoftext|>",
]


def build_phi3_tokenizer(folder, **config_changes):
    """A Phi-3 shaped tokenizer.json + tokenizer_config.json in ``folder`` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    # as in Phi-3's tokenizer.json: the added tokens without the rstrip flags of tokenizer_config.json
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_ADDED])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))

    def entry(content, rstrip, special=True):
        flags = dict(lstrip=False, normalized=False, rstrip=rstrip, single_word=False, special=special)
        return {"content": content, **flags}

    decoder = {"0": entry("<unk>", False), "1": entry("<s>", False), "2": entry("</s>", True, special=False)}
    for token in PHI3_ADDED:
        decoder[str(backend.token_to_id(token))] = entry(token, token != "<|endoftext|>")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    config.update(config_changes)
    config = {key: value for key, value in config.items() if value is not None}  # None removes a key
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def reference_tokenizer(folder):
    """transformers' tokenizer for ``folder`` as 4.x's ``AutoTokenizer`` builds it.

    Under 5.x, for a Llama-class folder: the fast tokenizer over tokenizer.json with the config's token
    flags, then transformers' own bos/eos post-processor for the config's add_bos_token/add_eos_token
    (4.x's LlamaTokenizerFast is exactly that composition)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if int(transformers.__version__.split(".")[0]) < 5 or config["tokenizer_class"] != "LlamaTokenizer":
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    reference.add_bos_token = config.get("add_bos_token", True)  # each setter rebuilds the post-processor
    reference.add_eos_token = config.get("add_eos_token", False)
    return reference


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    return build_phi3_tokenizer(tmp_path_factory.mktemp("phi3-tokenizer"))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_on_phi3_flags(phi3_folder, text):
    ours = Tokenizer.from_file(phi3_folder)
    assert ours.encode(text) == reference_tokenizer(phi3_folder)(text).input_ids


def test_rstrip_eats_the_template_newlines(phi3_folder):
    """The flags matter: tokenizer.json alone gives the "\\n" after <|user|>/<|end|>/<|assistant|> a token."""
    from tokenizers import Tokenizer as Backend

    text = apply_template("a red cat")
    ours = Tokenizer.from_file(phi3_folder).encode(text)
    raw = Backend.from_file(str(phi3_folder / "tokenizer.json")).encode(text).ids
    assert ours != raw and len(ours) < len(raw)


@pytest.mark.parametrize(
    "changes",
    [
        {"add_bos_token": False, "add_eos_token": True},
        {"add_bos_token": True, "add_eos_token": True},
        {"add_bos_token": None},
        {"added_tokens_decoder": None, "additional_special_tokens": ["<|user|>"]},
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_eos_token": True},
    ],
    ids=["eos-only", "bos-and-eos", "bos-by-default", "no-decoder-entries", "generic-class"],
)
def test_bos_eos_and_special_flags_follow_the_config(tmp_path, changes):
    folder = build_phi3_tokenizer(tmp_path / "tok", **changes)
    ours, reference = Tokenizer.from_file(folder), reference_tokenizer(folder)
    for text in TEXTS[:3] + TEXTS[-2:]:
        assert ours.encode(text) == reference(text).input_ids, text


def test_pipeline_from_pretrained_uses_the_folder_flags(tmp_path, model_folder):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    build_phi3_tokenizer(folder)
    pipe = OmniGenPipeline.from_pretrained(folder)
    reference = reference_tokenizer(folder)
    for text in TEXTS[:4]:
        assert pipe.tokenizer.encode(text) == reference(text).input_ids
    assert pipe.tokenizer.bos_token_id == 1


def test_sentencepiece_only_folder_says_what_is_needed(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"tokenizer.model but no tokenizer.json.*save_pretrained"):
        Tokenizer.from_file(tmp_path)


def test_unknown_words_are_named_once(tokenizer, caplog):
    from conftest import make_tokenizer_backend

    tok = Tokenizer(make_tokenizer_backend())
    with caplog.at_level(logging.WARNING, logger="omnigen.text.tokenizer"):
        ids = tok.encode("a red Hexagon and a zebra")
        tok.encode("a Hexagon , a red zebra")  # both already named
        tok.encode("a red circle")  # all known
    unk = tok.unk_token_id
    assert ids.count(unk) == 3  # hexagon, and, zebra
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert all(f"'{w}'" in messages[0] for w in ("Hexagon", "and", "zebra"))
    assert "'red'" not in messages[0]


def test_embedding_rows_cover_the_largest_id_of_a_vocabulary_with_gaps():
    from omnigen.text.tokenizer import embedding_rows

    assert embedding_rows({"<unk>": 0, "red": 1, "circle": 2}) == 3
    assert embedding_rows({"<unk>": 0, "red": 7, "circle": 2}) == 8  # ids 3-6 unused: still rows for them
