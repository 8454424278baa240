from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen.config import OmniGenConfig
from omnigen.training.base import resolve_base
from omnigen.training.config import TrainConfig
from omnigen.training.loss import edit_weights
from omnigen.training.trainer import lr_at, train

FAMILIES = ("t2i", "edit", "subject", "condition", "cv", "few_shot")
PIXEL_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 256,  # >= the miniature world tokenizer's size
    "pad_token_id": 3,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rope_scaling": None,
    "omnigen": {
        "in_channels": 3,
        "patch_size": 4,
        "latent_downsample": 1,
        "pos_embed_max_size": 8,
        "pos_embed_base_size": 8,
    },
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One miniworld sample of each task family, written in the X2I format."""
    from omnigen.miniworld.world import generate, save_tokenizer

    root = tmp_path_factory.mktemp("world")
    (root / "images").mkdir()
    chosen = {}
    for sample in generate(400, seed=1, split="train", size=16):
        chosen.setdefault(sample.task_type, sample)
    rows = []
    for family in FAMILIES:
        s = chosen[family]

        def save(array, name):
            Image.fromarray(array).save(root / "images" / name)
            return f"images/{name}"

        row = {
            "task_type": family,
            "instruction": s.instruction,
            "input_images": [save(a, f"{s.id}_in{k}.png") for k, a in enumerate(s.input_images)],
            "output_image": save(s.output_image, f"{s.id}_out.png"),
        }
        if s.few_shot:
            fs = s.few_shot
            row["few_shot"] = {
                "instruction": fs["instruction"],
                "input_images": [save(a, f"{s.id}_fs{k}.png") for k, a in enumerate(fs["input_images"])],
                "output_image": save(fs["output_image"], f"{s.id}_fsout.png"),
            }
        rows.append(row)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    save_tokenizer(root / "tokenizer.json")
    return root, [chosen[f] for f in FAMILIES]


def make_config(root, out, steps, **kw):
    data = dict(
        data=[str(root / "train.jsonl")],
        out_dir=str(out),
        tokenizer=str(root / "tokenizer.json"),
        model=PIXEL_MODEL,
        stages=[{"resolution": 16, "steps": steps, "batch_size": 6, "lr": 3e-3}],
        drop_text=0.0,
        drop_images=0.0,
        drop_both=0.0,
        ema_decay=0.0,
        t_distribution="uniform",
        log_every=10_000,
        checkpoint_every=10_000,
        warmup_steps=10,
        weight_decay=0.0,
        generation={
            "height": 16,
            "width": 16,
            "num_inference_steps": 20,
            "guidance_scale": 1.0,
            "img_guidance_scale": 1.0,
            "max_input_image_size": 16,
            "negative_prompt": "",
        },
    )
    data.update(kw)
    return TrainConfig.from_dict(data)


def test_edit_weighting_formula():
    x1 = torch.zeros(2, 3, 4, 4)
    reference = torch.zeros(2, 3, 4, 4)
    x1[:, :, :2] = 1.0  # the top half changed
    w = edit_weights(x1, reference, torch.tensor([True, False]), edit_weight=5.0, threshold=0.1)
    assert torch.all(w[0, :, 2:] == 1) and torch.all(w[0, :, :2] == 5)  # unchanged 1, changed more
    assert torch.all(w[1] == 1)  # no reference: plain MSE


def test_foreground_weighting_formula():
    from omnigen.training.config import LossSettings
    from omnigen.training.loss import foreground_mask, pixel_weights

    x1 = torch.full((2, 3, 8, 8), 1.0)  # white backgrounds
    x1[0, :, 2:4, 5:7] = torch.tensor([0.7, -0.8, -0.8])[:, None, None]  # a red 2x2 object in row 0
    x1[1, 0] = -1.0  # row 1: flat cyan, no object
    mask = foreground_mask(x1, 0.1)
    assert mask[0, 0, 2:4, 5:7].all() and mask[0].sum() == 4 and not mask[1].any()
    grown = foreground_mask(x1, 0.1, dilate=1)
    assert grown[0, 0, 1:5, 4:8].all() and grown[0].sum() == 16  # a 1-px ring around the object
    settings = LossSettings(foreground_weight=4.0, foreground_dilate=1)
    w = pixel_weights(x1, None, torch.tensor([False, False]), settings)
    assert torch.all(w[0][grown[0]] == 4) and torch.all(w[0][~grown[0]] == 1) and torch.all(w[1] == 1)
    edit = LossSettings(edit_weight=2.0, foreground_weight=4.0)
    reference = x1.clone()
    reference[0, :, 2:3, 5:7] = 1.0  # the edit painted the object's top row
    w = pixel_weights(x1, reference, torch.tensor([True, False]), edit)
    assert w[0, 0, 2, 5] == 8 and w[0, 0, 3, 5] == 4 and w[0, 0, 0, 0] == 1  # the factors multiply


def test_lr_schedule_warmup_and_stages(world, tmp_path):
    root, _ = world
    config = make_config(
        root,
        tmp_path,
        10,
        warmup_steps=4,
        stages=[
            {"resolution": 16, "steps": 5, "batch_size": 6, "lr": 1e-3},
            {"resolution": 16, "steps": 5, "batch_size": 6, "lr": 1e-4},
        ],
    )
    assert [round(lr_at(s, config), 6) for s in (0, 3, 4, 6)] == [0.00025, 0.001, 0.001, 0.0001]


def test_bad_config_keys_are_named(world, tmp_path):
    root, _ = world
    with pytest.raises(ValueError, match="unknown training config keys \\['lerning_rate'\\]"):
        TrainConfig.from_dict({**make_config(root, tmp_path, 1).__dict__, "lerning_rate": 1})
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: x.jsonl\nout_dir: o\nstages: [{resolution: 16, steps: 1, batch_size: 1}]\nmodel: {a: 1}\n"
    )
    with pytest.raises(ValueError, match="stages\\[0\\] must have exactly"):
        TrainConfig.load(path)
    path.write_text(
        "data = 'x.jsonl'\nout_dir = 'o'\nschedule = 'linear'\nmodel = {a = 1}\n"
        "stages = [{resolution = 16, steps = 1, batch_size = 1, lr = 0.1}]\n"
    )
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig.load(path.rename(tmp_path / "c.toml"))


def test_yaml_reads_scientific_notation_as_numbers_and_names_a_wrongly_typed_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: x.jsonl\nout_dir: o\nmodel: {a: 1}\nweight_decay: 1e-2\n"
        "stages: [{resolution: 16, steps: 1, batch_size: 1, lr: 1e-5}]\n"
    )
    config = TrainConfig.load(path)
    assert isinstance(config.stages[0].lr, float) and config.stages[0].lr == 1e-5
    assert config.weight_decay == 0.01
    assert TrainConfig.load(path, ["clip_grad=5E-1"]).clip_grad == 0.5
    with pytest.raises(TypeError, match="seed must be an int >= 0, got 'x'"):
        TrainConfig.load(path, ["seed=x"])
    with pytest.raises(TypeError, match="ema_decay must be a finite number >= 0 and < 1, got True"):
        TrainConfig.load(path, ["ema_decay=true"])
    with pytest.raises(ValueError, match="ema_decay must be a finite number >= 0 and < 1, got 1"):
        TrainConfig.load(path, ["ema_decay=1"])
    with pytest.raises(TypeError, match="stage lr must be a finite number > 0, got 'fast'"):
        TrainConfig.load(path, ["stages=[{resolution: 16, steps: 1, batch_size: 1, lr: fast}]"])
    with pytest.raises(ValueError, match="stage steps must be an int >= 1, got 0"):
        TrainConfig.load(path, ["stages=[{resolution: 16, steps: 0, batch_size: 1, lr: 0.1}]"])
    with pytest.raises(ValueError, match="drop_text must be a finite number between 0 and 1, got nan"):
        TrainConfig.load(path, ["drop_text=.nan"])
    with pytest.raises(TypeError, match="lora.dropout must be a finite number >= 0 and < 1, got 'some'"):
        TrainConfig.load(path, ["lora={rank: 2, dropout: some}"])
    with pytest.raises(TypeError, match="data must be a list of str or a mapping, got list \\[1\\]"):
        TrainConfig.load(path, ["data=[1]"])


def test_a_missing_data_set_fails_first_saying_how_to_make_it(world, tmp_path):
    root, _ = world
    missing = tmp_path / "mw"
    with pytest.raises(
        ValueError,
        match=f"data: {missing}/train.jsonl does not exist.*omnigen data miniworld --out {missing} --n N`",
    ):
        train(make_config(root, tmp_path / "run", 1, data=str(missing / "train.jsonl")), device="cpu")
    assert not (tmp_path / "run").exists()  # nothing started
    with pytest.raises(ValueError, match="val_data: .*heldout.jsonl does not exist.*--n N --split heldout`"):
        train(make_config(root, tmp_path / "run", 1, val_data=str(missing / "heldout.jsonl")), device="cpu")
    with pytest.raises(ValueError, match="tokenizer: .*tokenizer.json does not exist.*tokenizer.json there"):
        train(make_config(root, tmp_path / "run", 1, tokenizer=str(missing / "tokenizer.json")), device="cpu")
    with pytest.raises(ValueError, match="data: .*/\\*.jsonl does not exist"):
        train(make_config(root, tmp_path / "run", 1, data=str(missing / "*.jsonl")), device="cpu")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_training(world, tmp_path):
    from omnigen.text.tokenizer import Tokenizer

    root, _ = world
    needed = max(Tokenizer.from_file(root / "tokenizer.json").backend.get_vocab().values()) + 1
    config = make_config(root, tmp_path / "run", 1, model={**PIXEL_MODEL, "vocab_size": needed - 1})
    with pytest.raises(
        ValueError, match=f"has {needed} token ids .* holds {needed - 1}: set model.vocab_size"
    ):
        train(config, device="cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_recipes_from_scratch_config_fits_the_worlds_tokenizer(tmp_path):
    from omnigen.miniworld.world import save_tokenizer
    from omnigen.text.tokenizer import Tokenizer

    save_tokenizer(tmp_path / "tokenizer.json")
    config = TrainConfig.load("configs/miniworld.yaml")
    needed = max(Tokenizer.from_file(tmp_path / "tokenizer.json").backend.get_vocab().values()) + 1
    assert OmniGenConfig.from_dict(config.model).transformer.vocab_size >= needed


def test_fine_tuning_config_resolves_the_base_models_architecture_and_tokenizer(world, tmp_path):
    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.weights.checkpoint import save_model

    root, _ = world
    new = resolve_base(make_config(root, tmp_path / "a", 1))
    assert new.model_config == OmniGenConfig.from_dict(PIXEL_MODEL) and new.layout is None
    assert new.tokenizer_file == str(root / "tokenizer.json")
    base_config = OmniGenConfig.from_dict({**PIXEL_MODEL, "num_hidden_layers": 3})
    save_model(OmniGenModel(base_config), tmp_path / "base")
    Tokenizer.from_file(root / "tokenizer.json").save(tmp_path / "base")
    tuned = resolve_base(
        make_config(root, tmp_path / "b", 1, model={}, tokenizer=None, init_from=str(tmp_path / "base"))
    )
    assert tuned.model_config == base_config == tuned.folder_config and tuned.vocabulary_change is None
    assert tuned.layout.root == tmp_path / "base"
    assert tuned.tokenizer.encode("a red circle") == Tokenizer.from_file(root / "tokenizer.json").encode(
        "a red circle"
    )
    with pytest.raises(ValueError, match="a new model needs `tokenizer`"):
        resolve_base(make_config(root, tmp_path / "c", 1, tokenizer=None))


def test_a_fine_tuning_run_reads_the_base_folder_and_each_tokenizer_once(world, tmp_path, monkeypatch):
    """The config is plain data; ``resolve_base`` reads init_from's layout, config.json and tokenizer once
    per run, and the trainer passes its result on (no file is read again before the model is built)."""
    from collections import Counter

    from omnigen.model import OmniGenModel
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.training import base as base_module
    from omnigen.weights import checkpoint

    root, _ = world
    checkpoint.save_model(OmniGenModel(OmniGenConfig.from_dict(PIXEL_MODEL)), tmp_path / "base")
    Tokenizer.from_file(root / "tokenizer.json").save(tmp_path / "base")
    config = make_config(root, tmp_path / "run", 1, model={}, init_from=str(tmp_path / "base"))
    calls: Counter = Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in ("resolve_layout", "load_config"):
        wrapper = counted(name, getattr(checkpoint, name))
        monkeypatch.setattr(checkpoint, name, wrapper)
        monkeypatch.setattr(base_module, name, wrapper)
    read = Tokenizer.from_file.__func__
    monkeypatch.setattr(
        Tokenizer, "from_file", classmethod(lambda cls, path: (calls.update([str(path)]), read(cls, path))[1])
    )
    train(config, device="cpu")
    assert calls == {
        "resolve_layout": 1,
        "load_config": 1,
        str(root / "tokenizer.json"): 1,  # the run's tokenizer
        str(tmp_path / "base" / "tokenizer.json"): 1,  # the base folder's, for the vocabulary change
    }


def test_fine_tuning_an_fp16_folder_keeps_fp32_master_weights(world, tmp_path):
    from safetensors.torch import load_file

    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.weights.checkpoint import save_model

    root, _ = world
    torch.manual_seed(0)
    base = OmniGenModel(OmniGenConfig.from_dict(PIXEL_MODEL))
    base.initialize_weights()
    save_model(base, tmp_path / "base", dtype=torch.float16)  # as the shipped model is stored
    Tokenizer.from_file(root / "tokenizer.json").save(tmp_path / "base")
    config = make_config(
        root, tmp_path / "run", 1, model={}, tokenizer=None, init_from=str(tmp_path / "base")
    )
    train(config, device="cpu")
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.float32}


def test_sequence_lengths_track_the_processed_prompts_and_length_groups_train(world, tmp_path):
    from omnigen.config import OmniGenConfig
    from omnigen.text.processor import OmniGenProcessor
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.training.batches import BatchBuilder
    from omnigen.training.sampling_data import ConditionDropout
    from omnigen.training.x2i import compose_instruction, read_x2i

    root, _ = world
    samples = read_x2i(root / "train.jsonl").samples
    processor = OmniGenProcessor(
        Tokenizer.from_file(root / "tokenizer.json"), OmniGenConfig.from_dict(PIXEL_MODEL), 16
    )
    builder = BatchBuilder(samples, processor, None, ConditionDropout(0, 0, 0), torch.device("cpu"))
    approx = builder.sequence_lengths(16)
    actual = [len(processor(*compose_instruction(s)).input_ids) for s in samples]
    assert len(set(actual)) > 2 and len({a - b for a, b in zip(actual, approx)}) == 1  # off by the template
    train(make_config(root, tmp_path / "run", 2, length_groups=3), device="cpu")
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _subset_tokenizer(full, keep: int):
    """A WordLevel tokenizer over the first `keep` words of `full`, in reverse order (other ids)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from omnigen.text.tokenizer import Tokenizer

    vocab = full.backend.get_vocab()
    specials = [t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if i < 10]
    words = [t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if i >= 10][:keep][::-1]
    backend = Backend(WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = full.backend.normalizer, full.backend.pre_tokenizer
    backend.post_processor = full.backend.post_processor
    return Tokenizer(backend)


def test_fine_tuning_with_a_new_vocabulary_keeps_known_words(world, tmp_path):
    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.training.grow import remap_vocabulary
    from omnigen.weights.checkpoint import load_model, save_model

    root, _ = world
    full = Tokenizer.from_file(root / "tokenizer.json")
    small = _subset_tokenizer(full, 60)
    text = " ".join(t for t, i in small.backend.get_vocab().items() if i >= 10)
    old_ids, new_ids = small.encode(text), full.encode(text)
    assert old_ids != new_ids and 0 not in old_ids
    config = OmniGenConfig.from_dict({**PIXEL_MODEL, "vocab_size": small.backend.get_vocab_size()})
    torch.manual_seed(0)
    base = OmniGenModel(config)
    base.initialize_weights()
    remapped = remap_vocabulary(base, small.backend.get_vocab(), full.backend.get_vocab())
    assert remapped.llm.embed_tokens.weight.shape[0] == full.backend.get_vocab_size()
    old_rows = base.llm.embed_tokens.weight[torch.tensor(old_ids)]
    assert torch.equal(remapped.llm.embed_tokens.weight[torch.tensor(new_ids)], old_rows)
    unseen = [i for t, i in full.backend.get_vocab().items() if t not in small.backend.get_vocab()]
    mean = base.llm.embed_tokens.weight.mean(0)
    assert torch.allclose(remapped.llm.embed_tokens.weight[unseen], mean.expand(len(unseen), -1))
    # the trainer does the same when init_from's tokenizer differs from `tokenizer`
    save_model(base, tmp_path / "base")
    small.save(tmp_path / "base")
    run = make_config(root, tmp_path / "run", 1, model={}, init_from=str(tmp_path / "base"))
    resolved = resolve_base(run)
    assert resolved.model_config.transformer.vocab_size == full.backend.get_vocab_size()
    assert resolved.vocabulary_change == (small.backend.get_vocab(), full.backend.get_vocab())
    tuned, _ = load_model(train(run, device="cpu"))
    assert tuned.config.transformer.vocab_size == full.backend.get_vocab_size()
    assert Tokenizer.from_file(tmp_path / "run" / "final").backend.get_vocab() == full.backend.get_vocab()


def test_resume_reaches_the_same_parameters(world, tmp_path):
    root, _ = world
    straight = make_config(
        root, tmp_path / "a", 8, ema_decay=0.9, drop_text=0.3, t_distribution="logit_normal"
    )
    train(straight, device="cpu")
    split = make_config(root, tmp_path / "b", 8, ema_decay=0.9, drop_text=0.3, t_distribution="logit_normal")
    train(split, device="cpu", stop_after=3)
    assert not (tmp_path / "b" / "final").exists()
    train(split, device="cpu")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    curves = [[json.loads(x) for x in (tmp_path / n / "loss.jsonl").read_text().splitlines()] for n in "ab"]
    assert [r["step"] for r in curves[1]] == list(range(1, 9))
    assert [r["loss"] for r in curves[0]] == [r["loss"] for r in curves[1]]  # the same losses, exactly


def test_checkpoint_layout_is_the_one_running_jobs_resume_from(world, tmp_path):
    """The files and keys a checkpoint holds (what a run written by earlier code resumes from): changing
    any of them breaks resuming such runs, so this test pins them."""
    from safetensors.torch import load_file

    root, _ = world
    train(make_config(root, tmp_path / "run", 2, ema_decay=0.9), device="cpu", stop_after=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000001"
    folder = checkpoints / "step_00000001"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ema.safetensors",
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    state = json.loads((folder / "state.json").read_text())
    keys = ["step", "stage", "sampler", "world_size", "base_model", "grad_scaler", "ema_updates", "optimizer"]
    assert list(state) == keys
    assert (state["step"], state["stage"], state["world_size"], state["base_model"]) == (1, 0, 1, None)
    assert state["ema_updates"] == 1
    assert set(state["sampler"]) == {"epoch", "position", "seed", "num_replicas", "batch_size", "num_samples"}
    assert set(state["optimizer"]) == {"param_groups", "scalars", "with_state"}
    model = load_file(str(folder / "model.safetensors"))
    trainable = load_file(str(folder / "ema.safetensors")).keys()  # the EMA: every trainable parameter
    assert set(model) - set(trainable) == {"pos_embed"}  # the model file also holds the buffer
    optimizer = load_file(str(folder / "optimizer.safetensors"))
    moments = ("exp_avg", "exp_avg_sq", "step")
    assert set(optimizer) == {f"{name}.{moment}" for name in trainable for moment in moments}
    assert state["optimizer"]["scalars"] == {}
    assert sorted(state["optimizer"]["with_state"]) == sorted(trainable)
    groups = state["optimizer"]["param_groups"]
    assert sorted(n for g in groups for n in g["params"]) == sorted(trainable)


def test_resume_without_optimizer_state_for_unused_parameters(world, tmp_path):
    """Text-to-image rows only: input_x_embedder never gets a gradient, so AdamW holds no state for it.
    Resuming works and stays exact: the same losses, weights and optimizer state as a run straight
    through (the unused parameter still without state)."""
    from safetensors.torch import load_file

    root, _ = world
    rows = [r for r in (root / "train.jsonl").read_text().splitlines() if json.loads(r)["task_type"] == "t2i"]
    (tmp_path / "t2i.jsonl").write_text("\n".join(rows) + "\n")
    stage = {"resolution": 16, "steps": 4, "batch_size": 1, "lr": 3e-3}
    kw = dict(data=[str(tmp_path / "t2i.jsonl")], image_root=str(root), stages=[stage], warmup_steps=0)
    train(make_config(root, tmp_path / "a", 4, **kw), device="cpu")
    split = make_config(root, tmp_path / "b", 4, **kw)
    train(split, device="cpu", stop_after=2)
    stopped = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000002" / "optimizer.safetensors"))
    assert stopped and not any(k.startswith("input_x_embedder.") for k in stopped)
    train(split, device="cpu")
    curves = [
        [json.loads(x)["loss"] for x in (tmp_path / n / "loss.jsonl").read_text().splitlines()] for n in "ab"
    ]
    assert len(curves[1]) == 4 and curves[0] == curves[1]
    for name in ("model", "optimizer"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sigterm_checkpoints_the_step_it_arrives_in_and_a_rerun_finishes(world, tmp_path, monkeypatch):
    import signal

    from omnigen.training import trainer

    root, _ = world
    real_step = trainer.train_step

    def step_with_sigterm(run, step, *args):
        if step == 1:  # arrives during the second step
            signal.raise_signal(signal.SIGTERM)
        return real_step(run, step, *args)

    monkeypatch.setattr(trainer, "train_step", step_with_sigterm)
    config = make_config(root, tmp_path / "run", 4, warmup_steps=0)
    before = signal.getsignal(signal.SIGTERM)
    train(config, device="cpu")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    monkeypatch.setattr(trainer, "train_step", real_step)
    train(config, device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and (tmp_path / "run" / "final").is_dir()


def test_grad_accum_and_batch_split_take_the_same_steps(world, tmp_path):
    """Batch 3 x 2 micro-batches == batch 6: the same samples, the same per-sample draws, one normaliser."""
    root, _ = world
    curves = {}
    for name, batch, accum in (("big", 6, 1), ("accum", 3, 2)):
        stage = {"resolution": 16, "steps": 3, "batch_size": batch, "lr": 3e-3}
        config = make_config(
            root, tmp_path / name, 3, stages=[stage], grad_accum=accum, drop_text=0.3, warmup_steps=0
        )
        train(config, device="cpu")
        rows = [json.loads(x) for x in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        curves[name] = [r["loss"] for r in rows]
    assert max(abs(a - b) for a, b in zip(curves["big"], curves["accum"])) <= 1e-5, curves
    assert curves["big"][0] != curves["big"][-1]  # it trained


def test_overfits_each_task_family_and_reproduces_targets(world, tmp_path):
    """A tiny pixel-space model trained on one sample of each family: the velocity loss falls >= 10x and
    sampling (no guidance) redraws every target closely."""
    from omnigen.pipeline import OmniGenPipeline
    from omnigen.training.x2i import compose_instruction, read_x2i
    from omnigen.weights.checkpoint import load_model

    root, samples = world
    config = make_config(root, tmp_path, 1600)
    final = train(config, device="cpu")
    trained, _ = load_model(final)
    initial = _eval_loss(root, config, None)
    after = _eval_loss(root, config, trained)
    assert after * 10 <= initial, (initial, after)
    pipe = OmniGenPipeline.from_pretrained(final)
    for row, sample in zip(read_x2i(root / "train.jsonl").samples, samples):
        instruction, paths = compose_instruction(row)
        out = pipe(instruction, [str(p) for p in paths] or None, seed=0, progress=False)[0]
        error = np.abs(np.asarray(out, dtype=np.float32) - sample.output_image.astype(np.float32)).mean()
        assert error < 16, (row.task_type, error)  # of 255; an untrained model is far off (> 60)


def _eval_loss(root, config, model):
    """Mean velocity loss over the 6 samples at 8 fixed draws of (t, noise); a zero model if None."""
    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel
    from omnigen.model.vae import IdentityCodec
    from omnigen.text.processor import OmniGenProcessor
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.training.batches import BatchBuilder
    from omnigen.training.config import LossSettings
    from omnigen.training.loss import flow_matching_loss
    from omnigen.training.sampling_data import ConditionDropout
    from omnigen.training.x2i import read_x2i

    if model is None:
        torch.manual_seed(0)
        model = OmniGenModel(OmniGenConfig.from_dict(PIXEL_MODEL))
        model.initialize_weights()  # zero head: predicts 0
    tokenizer = Tokenizer.from_file(root / "tokenizer.json")
    builder = BatchBuilder(
        read_x2i(root / "train.jsonl").samples,
        OmniGenProcessor(tokenizer, model.config, 16),
        IdentityCodec(),
        ConditionDropout(0, 0, 0),
        torch.device("cpu"),
    )
    generator = torch.Generator().manual_seed(123)
    batch = builder(list(range(6)), 16, generator)
    with torch.no_grad():
        losses = [flow_matching_loss(model, batch, generator, LossSettings("uniform")).loss for _ in range(8)]
    return torch.stack(losses).mean().item()


def _random_pixel_model(layers):
    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel

    torch.manual_seed(0)
    model = OmniGenModel(OmniGenConfig.from_dict({**PIXEL_MODEL, "num_hidden_layers": layers}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    return model


def _edit_latents(model, root, samples, folder):
    """The final latents of 3 guided steps on the world's first edit sample, through a saved model folder."""
    from omnigen.generation import GenerationConfig
    from omnigen.model.vae import IdentityCodec
    from omnigen.pipeline import OmniGenPipeline
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.weights.checkpoint import save_model

    save_model(model, folder)
    Tokenizer.from_file(root / "tokenizer.json").save(folder)
    IdentityCodec(channels=3).save(folder)
    GenerationConfig(height=16, width=16, max_input_image_size=16).save(folder)
    edit = next(s for s in samples if s.input_images)
    return OmniGenPipeline.from_pretrained(folder)(
        edit.instruction,
        [Image.fromarray(a) for a in edit.input_images],
        height=16,
        width=16,
        num_inference_steps=3,
        guidance_scale=2.0,
        seed=0,
        output_type="latent",
        progress=False,
    )


def test_grow_width_keeps_the_outputs_and_trains_the_new_units(world, tmp_path):
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.training.grow import grow_width
    from omnigen.weights.checkpoint import load_model, save_model

    root, samples = world
    model = _random_pixel_model(2)
    wide = grow_width(model, 192)
    assert (
        wide.config.transformer.intermediate_size == wide.llm.layers[0].mlp.down_proj.weight.shape[1] == 192
    )
    assert not wide.llm.layers[0].mlp.down_proj.weight[:, 128:].any()
    old, new = (
        _edit_latents(model, root, samples, tmp_path / "old"),
        _edit_latents(wide, root, samples, tmp_path / "new"),
    )
    assert old.abs().max() > 0.1
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grow_intermediate must be an int >= 128, got 16"):
        grow_width(model, 16)
    save_model(model, tmp_path / "base")
    Tokenizer.from_file(root / "tokenizer.json").save(tmp_path / "base")
    config = make_config(
        root,
        tmp_path / "run",
        2,
        model={},
        tokenizer=None,
        init_from=str(tmp_path / "base"),
        grow_intermediate=192,
    )
    assert resolve_base(config).model_config.transformer.intermediate_size == 192
    trained, _ = load_model(train(config, device="cpu"))
    assert trained.llm.layers[0].mlp.down_proj.weight[:, 128:].any()  # the new units trained
    with pytest.raises(ValueError, match="grow_intermediate widens a trained model: it needs `init_from`"):
        make_config(root, tmp_path / "x", 1, grow_intermediate=192)


def test_grow_depth_keeps_the_outputs_and_interleaves_identity_blocks(world, tmp_path):
    from omnigen.training.grow import grow_depth, old_positions

    root, samples = world
    model = _random_pixel_model(2)
    grown = grow_depth(model, 5)
    assert grown.config.transformer.num_layers == 5 and old_positions(2, 5) == [0, 2]
    for old, new in zip((0, 1), (0, 2)):
        assert torch.equal(
            model.llm.layers[old].self_attn.qkv_proj.weight, grown.llm.layers[new].self_attn.qkv_proj.weight
        )
    for new in (1, 3, 4):
        block = grown.llm.layers[new]
        assert not block.self_attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()
        assert block.self_attn.qkv_proj.weight.std() > 0  # trainable from the first step
    old, new = (
        _edit_latents(model, root, samples, tmp_path / "old"),
        _edit_latents(grown, root, samples, tmp_path / "new"),
    )
    assert old.abs().max() > 0.1
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grow_layers must be an int >= 2, got 1"):
        grow_depth(model, 1)


def test_grow_layers_config_trains_the_deeper_model(world, tmp_path):
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.weights.checkpoint import load_model, save_model

    root, _ = world
    save_model(_random_pixel_model(2), tmp_path / "base")
    Tokenizer.from_file(root / "tokenizer.json").save(tmp_path / "base")
    config = make_config(
        root, tmp_path / "run", 2, model={}, tokenizer=None, init_from=str(tmp_path / "base"), grow_layers=3
    )
    assert resolve_base(config).model_config.transformer.num_layers == 3
    trained, _ = load_model(train(config, device="cpu"))
    assert trained.config.transformer.num_layers == 3
    assert trained.llm.layers[1].self_attn.o_proj.weight.any()  # the new block trained
    with pytest.raises(ValueError, match="grow_layers deepens a trained model: it needs `init_from`"):
        make_config(root, tmp_path / "x", 1, grow_layers=3)
    with pytest.raises(TypeError, match="grow_layers must be an int >= 1 or None, got 'deep'"):
        make_config(root, tmp_path / "x", 1, model={}, init_from=str(tmp_path / "base"), grow_layers="deep")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_with_its_loss_scale(world, tmp_path, precision):
    """Autocast runs train; fp16 scales the loss (torch.amp.GradScaler) and a resumed run continues with
    the saved scale, reaching the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    root, _ = world
    kw = dict(precision=precision, drop_text=0.3, warmup_steps=0)
    train(make_config(root, tmp_path / "a", 4, **kw), device="cpu")
    split = make_config(root, tmp_path / "b", 4, **kw)
    train(split, device="cpu", stop_after=2)
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step_00000002" / "state.json").read_text())
    if precision == "fp16":
        assert saved["grad_scaler"]["scale"] > 1.0  # the loss really was scaled
    else:
        assert saved["grad_scaler"] == {}
    train(split, device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[0]["loss"] != rows[-1]["loss"]
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    end = json.loads((tmp_path / "b" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert (
        end["grad_scaler"]
        == json.loads((tmp_path / "a" / "checkpoints" / "step_00000004" / "state.json").read_text())[
            "grad_scaler"
        ]
    )


def test_validation_loss_is_the_exported_ema_models_loss_at_fixed_draws(world, tmp_path):
    from omnigen.model.vae import IdentityCodec
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.training.batches import BatchBuilder
    from omnigen.training.distributed import Runtime
    from omnigen.training.validation import Validator
    from omnigen.weights.checkpoint import load_model

    root, _ = world
    kw = dict(ema_decay=0.5, val_data=str(root / "train.jsonl"), val_every=2, val_samples=5, edit_weight=3.0)
    config = make_config(root, tmp_path / "run", 4, **kw)
    train(config, device="cpu", stop_after=3)
    rows = [json.loads(x) for x in (tmp_path / "run" / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and rows[0]["weights"] == "ema"  # 3: the stop
    final = train(config, device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "run" / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]  # resumed at 3: lines up to 3 kept, once each
    model, _ = load_model(final)  # the EMA export
    builder = BatchBuilder.from_config(
        config,
        Tokenizer.from_file(root / "tokenizer.json"),
        IdentityCodec(),
        model.config,
        torch.device("cpu"),
    )
    validator = Validator(
        config, builder, Runtime(rank=0, world=1, device=torch.device("cpu"), kind="single")
    )
    assert len(validator.samples) == 5
    again = [validator(model, 16, 2), validator(model, 16, 5)]  # batching does not change it
    assert abs(again[0] - rows[-1]["val_loss"]) <= 1e-5 and abs(again[1] - again[0]) <= 1e-5
    assert abs(rows[0]["val_loss"] - rows[1]["val_loss"]) > 1e-4  # the weights moved it
    with pytest.raises(ValueError, match="val_samples must be an int >= 1, got 0"):
        make_config(root, tmp_path / "x", 1, val_samples=0)


def test_extending_the_tokenizer_gives_new_words_their_own_ids_and_trained_rows(
    world, tmp_path, caplog, monkeypatch
):
    """A base model whose tokenizer lacks some of the data's words, fine-tuned with extend_tokenizer and
    add_words: each new word gets its own id (known ids unchanged), its embedding row starts at the mean
    of the old rows, the rows of words in the data train, and the export reads them with its tokenizer.
    The JSONL is read once (for the new words and the batches)."""
    import logging
    from collections import Counter

    from safetensors.torch import load_file

    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel
    from omnigen.text.tags import BARE_TAG_PATTERN
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.weights.checkpoint import save_model

    root, _ = world
    full = Tokenizer.from_file(root / "tokenizer.json")
    rows = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    texts = [r["instruction"] for r in rows] + [r["few_shot"]["instruction"] for r in rows if "few_shot" in r]
    instructions = [chunk for text in texts for chunk in BARE_TAG_PATTERN.split(text)[::2]]
    split = full.backend.pre_tokenizer.pre_tokenize_str
    words = sorted({w for text in instructions for w, _ in split(text.lower()) if w.isalpha() and len(w) > 3})
    dropped = set(words[::3])  # the base model's tokenizer lacks a third of the data's longer words
    data = json.loads(full.backend.to_str())  # the special tokens (ids 0-9) first, then the words
    kept = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda x: x[1]) if t not in dropped]
    data["model"]["vocab"] = {t: i for i, t in enumerate(kept)}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "tokenizer.json").write_text(json.dumps(data))
    small = Tokenizer.from_file(tmp_path / "base")
    unknown = list(dict.fromkeys(w for text in instructions for w in small.unknown_words(text)))
    assert sorted(unknown) == sorted(dropped)  # the base tokenizer maps them to <unk>
    config = OmniGenConfig.from_dict({**PIXEL_MODEL, "vocab_size": small.backend.get_vocab_size()})
    torch.manual_seed(0)
    base = OmniGenModel(config)
    base.initialize_weights()
    save_model(base, tmp_path / "base")
    run = make_config(
        root,
        tmp_path / "run",
        3,
        model={},
        init_from=str(tmp_path / "base"),
        tokenizer=None,  # the base model's
        extend_tokenizer=True,
        add_words=["Zorblax"],
        warmup_steps=0,
    )
    from omnigen.training import x2i

    reads: Counter = Counter()
    iter_rows = x2i._iter_rows
    monkeypatch.setattr(x2i, "_iter_rows", lambda file: (reads.update([file.name]), iter_rows(file))[1])
    with caplog.at_level(logging.WARNING, logger="omnigen.text.tokenizer"):
        final = train(run, device="cpu")
    assert reads["train.jsonl"] == 1, reads
    assert "does not know" not in caplog.text  # every word of the data has an id now
    tuned = Tokenizer.from_file(final)
    old_size = small.backend.get_vocab_size()
    new_ids = {w: tuned.encode(w)[-1] for w in [*unknown, "zorblax"]}
    assert sorted(new_ids.values()) == list(range(old_size, old_size + len(new_ids)))
    known = " ".join(t for t, i in small.backend.get_vocab().items() if i >= 10)
    assert tuned.encode(known) == small.encode(known)
    table = load_file(str(final / "model.safetensors"))["llm.embed_tokens.weight"]
    old_table = base.llm.embed_tokens.weight.detach()
    assert table.shape[0] == old_size + len(new_ids)
    mean = old_table.mean(0)
    assert torch.allclose(table[new_ids["zorblax"]], mean)  # not in the data: no gradient, unchanged
    moved = [(table[new_ids[w]] - mean).abs().max().item() for w in unknown]
    assert min(moved) > 1e-4, moved  # every new word of the data trained its row
