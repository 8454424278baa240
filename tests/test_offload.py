"""Memory that does not grow with copies (one cache row per prompt and branch) and streaming offload."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_model, tiny_config, tiny_pipeline
from omnigen.model import offload
from omnigen.model.layers import Block
from omnigen.model.runner import Runner
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor

EDIT = "make it blue <img><|image_1|></img>"
MODES = [dict(separate_cfg_infer=s, offload_kv_cache=o) for s in (True, False) for o in (True, False)]
NO_CACHE = dict(separate_cfg_infer=False, offload_kv_cache=False, use_kv_cache=False)


def mode_id(mode: dict) -> str:
    return "-".join(f"{key}={int(value)}" for key, value in mode.items())


def run(pipeline, prompt, images=None, **kw):
    kw.setdefault("seed", 3)
    kw.setdefault("progress", False)
    kw.setdefault("output_type", "latent")
    return pipeline(prompt, images, **kw)


@pytest.fixture
def cache_bytes(pipeline, monkeypatch):
    """The bytes of every cache the pipeline's prefills make, in order."""
    seen: list[int] = []
    prefill = pipeline.model.prefill

    def counting(*args, **kwargs):
        cache = prefill(*args, **kwargs)
        seen.append(cache.nbytes())
        return cache

    monkeypatch.setattr(pipeline.model, "prefill", counting)
    return seen


# ---------------------------------------------------------------------------------- copies: cache and output
@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_cache_bytes_do_not_depend_on_images_per_prompt(pipeline, cache_bytes, rgb_image, mode):
    prompt, images = EDIT, [[rgb_image()]]  # three CFG branches
    for k in (1, 3):
        run(pipeline, [prompt], images, num_images_per_prompt=k, **mode)
    one, three = cache_bytes[: len(cache_bytes) // 2], cache_bytes[len(cache_bytes) // 2 :]
    assert one == three and sum(one) > 0
    cache_bytes.clear()
    run(pipeline, [prompt] * 3, images * 3, **mode)  # 3 prompts: 3 rows each
    assert sum(cache_bytes) == 3 * sum(one)


@pytest.mark.parametrize("mode", [*MODES, NO_CACHE], ids=mode_id)
def test_images_per_prompt_equal_repeated_rows_bit_for_bit(pipeline, rgb_image, mode, one_thread):
    """k images of a prompt from one broadcast row equal what a row per image gives (the previous layout:
    the prompt repeated k times, image j seeded seed + j), exactly. At one thread: with separate CFG the
    broadcast layout prefills a batch of 1 row, the repeated one 3 rows, and CPU attention is batch-
    invariant only single-threaded (``conftest.torch_threads``)."""
    for prompt, images in (("a red cat", None), (EDIT, [rgb_image()])):
        got = run(pipeline, prompt, images, num_images_per_prompt=3, **mode)
        rows = run(pipeline, [prompt] * 3, None if images is None else [images] * 3, **mode)
        assert got.shape[0] == 3
        torch.testing.assert_close(got, rows, atol=0, rtol=0)


def test_one_cache_row_serves_several_step_rows(model, tokenizer, rgb_image):
    processor = OmniGenProcessor(tokenizer, model.config, 32)
    prompts = [processor(EDIT, [rgb_image()]), processor("a red cat", [])]  # padded rows
    latents = [[torch.randn(4, 16, 16)], []]
    n = model.config.num_image_tokens(32, 32)
    one = collate(prompts, latents, 3)
    repeated = collate([p for p in prompts for _ in range(3)], [x for x in latents for _ in range(3)], 3)
    x, t = torch.randn(6, 4, 16, 16), torch.full((6,), 0.4)
    with torch.no_grad():
        small, big = model.prefill(one, n), model.prefill(repeated, n)
        assert 3 * small.nbytes() == big.nbytes()
        torch.testing.assert_close(model(x, t, cache=small), model(x, t, cache=big), atol=0, rtol=0)
        torch.testing.assert_close(
            model(x, t, condition=one), model(x, t, condition=repeated), atol=0, rtol=0
        )
        with pytest.raises(ValueError, match="5 rows .* 2"):
            model(x[:5], t[:5], cache=small)
        with pytest.raises(ValueError, match="1 rows .* 2"):
            model(x[:1], t[:1], condition=one)


# ---------------------------------------------------------------------------------- streaming offload
def test_offload_model_equals_resident_and_copies_nothing_back(tokenizer, monkeypatch):
    model = random_model(tiny_config())
    pipe = tiny_pipeline(model, tokenizer, negative_prompt="blurry")
    base = run(pipe, "a red cat")
    moved: list[str] = []
    module_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if isinstance(self, Block):
            moved.append(f"{args} {kwargs}")
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    got = run(pipe, "a red cat", offload_model=True)
    torch.testing.assert_close(got, base, atol=0, rtol=0)
    assert moved == [], "offload must not move whole layers (and so not copy them back)"
    masters = pipe.runner.offloaded.masters
    state = [[(m.data_ptr(), m._version) for m in layer] for layer in masters]
    torch.testing.assert_close(run(pipe, "a red cat", offload_model=True), base, atol=0, rtol=0)
    assert pipe.runner.offloaded.masters is masters, "the masters are made once and reused"
    assert [[(m.data_ptr(), m._version) for m in layer] for layer in masters] == state
    run(pipe, "a red cat")  # back to resident layers
    assert pipe.runner.offloaded is None


def test_layers_stream_with_prefetch_and_drop_their_copies(tokenizer, monkeypatch):
    """A stand-in device: every copy to the 'device' is a clone. Layer i+1's weights and keys/values are
    copied before layer i runs, layer i runs on its copies, and afterwards points back to the untouched
    host masters; no tensor is ever written back."""
    config = tiny_config()
    config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, num_layers=3))
    model = random_model(config)
    pipe = tiny_pipeline(model, tokenizer, negative_prompt="blurry")
    base = run(pipe, "a red cat", offload_kv_cache=True)
    events: list[tuple[str, int]] = []
    owner: dict[int, int] = {}  # host data_ptr -> layer index

    def fake_copy(tensor, device, non_blocking):
        events.append(("copy", owner.get(tensor.data_ptr(), -1)))
        return tensor.clone()

    monkeypatch.setattr(offload, "copy_to", fake_copy)
    weights = offload.offload_layers(model.llm.layers)
    pipe.runner = Runner(offloaded=weights)  # the call reuses these masters (they are current)
    for index, layer in enumerate(weights.masters):
        owner.update({m.data_ptr(): index for m in layer})
    before = [[(m.data_ptr(), m._version) for m in layer] for layer in weights.masters]

    def check(index):
        def hook(module, args):
            events.append(("run", index))
            ptrs = {p.data_ptr() for p in module.parameters()}
            assert not ptrs & {m.data_ptr() for m in weights.masters[index]}, "runs on its device copy"

        return hook

    handles = [layer.register_forward_pre_hook(check(i)) for i, layer in enumerate(model.llm.layers)]
    handles.append(model.llm.register_forward_pre_hook(lambda module, args: events.append(("forward", -1))))
    prefill = model.prefill

    def register_cache(*args, **kwargs):
        cache = prefill(*args, **kwargs)
        for index, (k, v) in enumerate(cache.layers):
            owner.update({k.data_ptr(): index, v.data_ptr(): index})
        return cache

    monkeypatch.setattr(model, "prefill", register_cache)
    got = run(pipe, "a red cat", offload_model=True, offload_kv_cache=True)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, base, atol=0, rtol=0)
    passes = _split(events)  # [prefill cond, prefill uncond, step 0 cond, step 0 uncond, ...]
    assert len(passes) == 2 + 2 * 2

    def expected(kv: int) -> list[tuple[str, int]]:  # kv: copies of keys/values per layer
        copies = [[("copy", i)] * (len(weights.masters[i]) + kv) for i in range(3)]
        return copies[0] + copies[1] + [("run", 0)] + copies[2] + [("run", 1), ("run", 2)]

    assert passes[0] == passes[1] == expected(kv=0), "the prefill streams the weights"
    assert all(p == expected(kv=2) for p in passes[2:]), "a step streams weights and keys/values"
    assert [[(m.data_ptr(), m._version) for m in layer] for layer in weights.masters] == before
    for slots, masters in zip(weights.slots, weights.masters):  # at rest: the layers are their masters
        assert [offload._get(slot).data_ptr() for slot in slots] == [m.data_ptr() for m in masters]


def _split(events: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    passes: list[list[tuple[str, int]]] = []
    for event in events:
        if event[0] == "forward":
            passes.append([])
        else:
            passes[-1].append(event)
    return passes


def test_offloaded_runner_refuses_layers_that_are_not_its_own(model):
    other = random_model(tiny_config())
    runner = Runner(offloaded=offload.offload_layers(other.llm.layers))
    x = torch.randn(1, 3, model.config.transformer.hidden_size)
    positions = torch.arange(3)[None]
    inputs = model.llm.inputs(positions, positions[:, -1], None)
    with pytest.raises(ValueError, match="offloaded weights are not those of these layers"):
        model.llm(x, inputs, runner)
    other.llm(x, inputs, runner)  # its own layers run


def test_no_streams_or_pinning_without_cuda():
    tensor = torch.randn(4)
    if not torch.cuda.is_available():
        assert offload.pin(tensor) is tensor
    streamer = offload.Streamer()
    transfer = streamer.to_device([tensor], torch.device("cpu"))
    assert transfer.ready is None and streamer.wait(transfer, torch.device("cpu"))[0] is tensor
    assert streamer.done(torch.device("cpu")) is None
    assert streamer._streams == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side streams, pinned masters)")
def test_cuda_offload_streams_equal_resident(tokenizer):
    model = random_model(tiny_config())
    pipe = tiny_pipeline(model, tokenizer, negative_prompt="blurry").to("cuda")
    base = run(pipe, "a red cat", offload_kv_cache=False)
    got = run(pipe, "a red cat", offload_model=True, offload_kv_cache=True)
    assert all(m.is_pinned() for layer in pipe.runner.offloaded.masters for m in layer)
    assert all(p.device.type == "cpu" for p in model.llm.layers.parameters()), "at rest on the host"
    torch.testing.assert_close(got, base, atol=1e-5, rtol=0)
