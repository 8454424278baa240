"""Speed and memory options: step cache, mask-free step attention, torch.compile, int8 weights, the fp16
guard, tiled VAE decoding, and layer placement over devices. Each exact option is checked against the
plain path; each approximate one against a bound."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from conftest import random_model, tiny_config, tiny_pipeline
from omnigen.model.placement import place_layers, plan_layers
from omnigen.sampling.step_cache import StepCache
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor
from omnigen.weights.quantize import Int8Linear, linear_weight_bytes, quantize_int8

EDIT = "make it blue <img><|image_1|></img>"


def make_pipeline(model, tokenizer, steps: int = 3, size: int = 32):
    defaults = dict(
        height=size, width=size, num_inference_steps=steps, negative_prompt="low quality , blurry"
    )
    return tiny_pipeline(model, tokenizer, **defaults)


def run(pipeline, prompt, images=None, **kw):
    kw.setdefault("seed", 3)
    kw.setdefault("progress", False)
    kw.setdefault("output_type", "latent")
    return pipeline(prompt, images, **kw)


# ---------------------------------------------------------------------------------------- step cache
def test_step_cache_rule_accumulates_and_forces_first_and_last_steps():
    cache = StepCache(threshold=0.25, num_steps=8)
    base = torch.ones(1, 4, 2)
    decisions = []
    for i in range(8):
        cache.begin_step()
        indicator = base * (1.1**i)  # relative change 0.1 at every step
        compute = cache.should_compute(indicator, branch=0)
        decisions.append(compute)
        assert cache.should_compute(indicator * 3, branch=1) == compute  # other branches follow
        if compute:
            cache.store(0, torch.zeros(1))
            cache.store(1, torch.zeros(1))
    # step 0 forced; A = .1, .2, .3 -> compute at 3; again at 6; step 7 is the last (forced)
    assert decisions == [True, False, False, True, False, False, True, True]
    assert cache.changes[1] == pytest.approx(0.1, rel=1e-5)
    assert cache.num_computed == 4


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), True])
def test_step_cache_rejects_bad_thresholds(pipeline, threshold):
    with pytest.raises(
        (ValueError, TypeError), match="step_cache_threshold must be a finite number between 0 and 10"
    ):
        run(pipeline, "a red cat", step_cache_threshold=threshold)


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("separate", [True, False])
def test_step_cache_threshold_zero_is_exact(pipeline, rgb_image, use_kv_cache, separate):
    kw = dict(use_kv_cache=use_kv_cache, separate_cfg_infer=separate, num_inference_steps=4)
    base = run(pipeline, EDIT, [rgb_image()], **kw)
    got = run(pipeline, EDIT, [rgb_image()], step_cache_threshold=0.0, **kw)
    torch.testing.assert_close(got, base, atol=1e-6, rtol=0)


def count_layer_calls(pipeline, **kw):
    """Calls of the last decoder layer at each sampling step (prefills excluded)."""
    calls, per_step = [], []
    hook = pipeline.model.llm.layers[-1].register_forward_hook(lambda *args: calls.append(1))

    def callback(pipe, step, t, latents):
        per_step.append(len(calls))
        calls.clear()

    try:
        out = run(pipeline, "a red cat", callback_on_step_end=callback, **kw)
    finally:
        hook.remove()
    return out, per_step


def test_step_cache_skips_middle_steps(pipeline):
    steps = 10
    exact, exact_calls = count_layer_calls(pipeline, num_inference_steps=steps)
    assert exact_calls[1:] == [2] * (steps - 1)  # cond + uncond at every step (step 0 also counts prefills)
    got, calls = count_layer_calls(pipeline, num_inference_steps=steps, step_cache_threshold=0.5)
    computed = [c > 0 for c in [calls[0] - 2, *calls[1:]]]  # step 0 also ran the two prefills
    assert computed[0] and computed[-1], "the first and last steps always run"
    assert 2 <= sum(computed) < steps
    assert all(c in (0, 2) for c in calls[1:]), "the CFG branches follow one decision per step"
    assert torch.isfinite(got).all() and (got - exact).abs().max() > 0


# ---------------------------------------------------------------------------------------- mask-free steps
@pytest.mark.parametrize("with_image", [False, True])
def test_mask_free_step_equals_masked_step(model, tokenizer, rgb_image, with_image):
    processor = OmniGenProcessor(tokenizer, model.config, 32)
    prompt = processor(EDIT, [rgb_image()]) if with_image else processor("a red cat", [])
    latents = [[torch.randn(4, 16, 16)]] if with_image else [[]]
    condition = collate([prompt], latents, 3)
    n = model.config.num_image_tokens(32, 32)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        free, masked = model.prefill(condition, n), model.prefill(condition, n, mask_free=False)
        for t in (0.0, 0.4, 0.9):
            tt = torch.tensor([t])
            got, want = model(x, tt, cache=free), model(x, tt, cache=masked)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(got, model(x, tt, condition=condition), atol=1e-5, rtol=0)
    assert model.step_inputs(free, n, 1).mask is None, "no padding: the step must run without a mask"
    assert model.step_inputs(masked, n, 1).mask is not None
    assert free.step_inputs == {}, "the model reads the step inputs a caller stored, never stores them"


def test_padded_rows_keep_the_mask(model, tokenizer):
    processor = OmniGenProcessor(tokenizer, model.config, 32)
    rows = [processor("a red cat", []), processor("a blue dog in the style of a photo", [])]
    condition = collate(rows, [[], []], 3)
    assert not condition.token_mask.all()
    n = model.config.num_image_tokens(32, 32)
    cache = model.prefill(condition, n)
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, cache=cache), model(x, t, condition=condition), atol=1e-5, rtol=0
        )
    assert model.step_inputs(cache, n, 2).mask is not None


def test_pipeline_mask_free_option_is_exact(pipeline, rgb_image):
    for prompt, images in (("a red cat", None), (EDIT, [rgb_image()])):
        masked = run(pipeline, prompt, images, mask_free_attention=False)
        got = run(pipeline, prompt, images)
        torch.testing.assert_close(got, masked, atol=5e-5, rtol=1e-5)  # 3 guided steps of fp32 reordering


# ---------------------------------------------------------------------------------------- torch.compile
def _can_compile() -> bool:
    try:
        import torch._inductor  # noqa: F401
    except Exception:
        return False
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _can_compile(), reason="torch.compile needs inductor and a C++ compiler")
def test_compiled_blocks_match_eager(tokenizer):
    """About 40 s on a loaded 2-core CPU, almost all of it compiling one block; then with streaming offload."""
    pipe = make_pipeline(random_model(tiny_config()), tokenizer)
    eager = run(pipe, "a red cat")
    state = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    pipe.compile()
    assert pipe.model.state_dict().keys() == state.keys()
    torch.testing.assert_close(run(pipe, "a red cat"), eager, atol=5e-5, rtol=1e-5)
    # streaming offload swaps each block's weights for copies around the compiled forward
    torch.testing.assert_close(run(pipe, "a red cat", offload_model=True), eager, atol=5e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- int8 weights
def test_int8_linear_dequantizes_within_half_a_step():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 20)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and isinstance(q, torch.nn.Linear)
    error = (q.dequantized_weight(torch.float32) - linear.weight).abs()
    assert (error <= q.weight_scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized_weight(x.dtype), q.bias))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_quantize_int8_native_is_close_and_4x_smaller(tokenizer):
    model = random_model(tiny_config())
    pipe = make_pipeline(model, tokenizer)
    exact = run(pipe, "a red cat", num_inference_steps=2)
    before = linear_weight_bytes(model.llm.layers)
    keys = set(model.state_dict())
    assert quantize_int8(model, backend="native") == "native"
    after = linear_weight_bytes(model.llm.layers)
    rows = sum(m.out_features for m in model.llm.layers.modules() if isinstance(m, torch.nn.Linear))
    assert after == before // 4 + rows * 4  # int8 weights + one fp32 scale per row
    assert before / after > 3.5  # ~4x at real sizes (in_features 3072); tiny rows pay for their scales
    assert keys <= set(model.state_dict())  # the original keys remain (plus the scales)
    assert _relative_error(run(pipe, "a red cat", num_inference_steps=2), exact) < 0.05


def test_quantize_int8_torchao(tokenizer):
    """torchao is a dev dependency: this runs in CI (no skip). The weights really become int8 (torchao's
    Int8Tensor: int8 data, one scale per row), the rest of the model stays fp32, the output stays close."""
    from torchao.quantization import Int8Tensor

    model = random_model(tiny_config())
    pipe = make_pipeline(model, tokenizer)
    exact = run(pipe, "a red cat", num_inference_steps=2)
    linears = {n: m for n, m in model.llm.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    before = linear_weight_bytes(model.llm.layers)
    assert quantize_int8(model) == "torchao"  # "auto" picks torchao when it imports
    for name, linear in linears.items():
        weight = linear.weight
        assert isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8, name
        assert weight.qdata.shape == originals[name].shape and weight.scale.shape[0] == weight.shape[0]
        dequantized = weight.qdata.float() * weight.scale.float().reshape(-1, 1)
        assert ((dequantized - originals[name]).abs() <= weight.scale.reshape(-1, 1) / 2 + 1e-6).all(), name
    assert type(model.x_embedder.proj.weight) is torch.nn.Parameter  # only the decoder's linears change
    assert model.x_embedder.proj.weight.dtype == torch.float32
    assert before / linear_weight_bytes(model.llm.layers) > 3.5
    got = run(pipe, "a red cat", num_inference_steps=2)
    assert 0 < _relative_error(got, exact) < 0.05


def test_quantize_int8_rejects_unknown_backend(model):
    with pytest.raises(ValueError, match="backend"):
        quantize_int8(model, backend="int4")


# ---------------------------------------------------------------------------------------- fp16 guard
def _fp16_matmul_works() -> bool:
    try:
        a = torch.ones(4, 4, dtype=torch.float16)
        return bool(torch.isfinite(a @ a).all())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _fp16_matmul_works(), reason="no fp16 matmul on this CPU build")
def test_fp16_guard_keeps_the_residual_stream_finite(tokenizer):
    """Four layers whose MLPs each add up to ~50k: every sublayer fits fp16, their sum does not."""
    config = tiny_config()
    config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, num_layers=4))
    model = random_model(config)
    peak = []
    with torch.no_grad():
        for layer in model.llm.layers:
            layer.mlp.down_proj.weight.mul_(8000.0)
        hook = model.llm.layers[-1].register_forward_hook(lambda m, a, out: peak.append(out[0].abs().max()))
        pipe = make_pipeline(model, tokenizer, steps=2)
        exact = run(pipe, "a red cat")
        hook.remove()
    assert max(peak) > torch.finfo(torch.float16).max, "the fp32 residual stream must exceed fp16's range"
    model.half()
    got = run(pipe, "a red cat")
    assert torch.isfinite(got).all()
    assert _relative_error(got, exact) < 0.05
    pipe.runner = dataclasses.replace(pipe.runner, fp16_guard=False)
    assert not torch.isfinite(run(pipe, "a red cat")).all(), "without the guard fp16 overflows"


# ---------------------------------------------------------------------------------------- VAE tiling
def test_vae_tiling_decodes_in_tiles_and_restores_the_setting(tokenizer, monkeypatch):
    pipe = make_pipeline(random_model(tiny_config()), tokenizer, steps=1, size=64)
    vae = pipe.codec.vae
    assert 64 // pipe.codec.downsample > vae.tile_latent_min_size  # the latents are larger than a tile
    plain = run(pipe, "a red cat", output_type="pt")
    tiled_calls = []
    original = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: tiled_calls.append(1) or original(*a, **k))
    tiled = run(pipe, "a red cat", output_type="pt", vae_tiling=True)
    assert tiled_calls and not vae.use_tiling
    assert tiled.shape == plain.shape == (1, 3, 64, 64)
    assert (tiled - plain).abs().mean() < 0.1  # blended tiles, close to the one-shot decode
    run(pipe, "a red cat", output_type="pt")
    assert len(tiled_calls) == 1


def test_channels_last_vae_matches_and_switches_back(tokenizer, rgb_image):
    pipe = make_pipeline(random_model(tiny_config()), tokenizer, steps=2)
    plain = run(pipe, EDIT, [rgb_image(32, 32)], output_type="pt")
    conv = next(m for m in pipe.codec.vae.modules() if isinstance(m, torch.nn.Conv2d))
    pipe.codec.channels_last()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    fast = run(pipe, EDIT, [rgb_image(32, 32)], output_type="pt")
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)  # encode and decode, float rounding only
    pipe.codec.channels_last(False)
    assert conv.weight.is_contiguous()


# ---------------------------------------------------------------------------------------- placement
def test_plan_layers_balances_bytes():
    assert plan_layers([10] * 4, 2) == [0, 0, 1, 1]
    assert plan_layers([10] * 8, 2, memory=[1, 3]) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert plan_layers([10] * 4, 2, extra_bytes=20) == [0, 1, 1, 1]  # device 0 also holds the embeddings
    assert plan_layers([10] * 2, 3) == [0, 2]
    assert plan_layers([10, 30, 10, 10], 2) == [0, 0, 1, 1]


def test_place_layers_on_two_cpus_gives_the_same_output(tokenizer):
    model = random_model(tiny_config())
    pipe = make_pipeline(model, tokenizer)
    base = run(pipe, "a red cat")
    assert place_layers(model, ["cpu", "cpu"]).devices == (torch.device("cpu"),) * 2
    assert pipe.place_layers(["cpu", "cpu"]) is pipe
    assert pipe.runner.devices == (torch.device("cpu"),) * 2
    torch.testing.assert_close(run(pipe, "a red cat"), base, atol=0, rtol=0)
    assert pipe.runner.devices == (torch.device("cpu"),) * 2, "the split outlives the call"
    pipe.to("cpu")
    assert pipe.runner.devices is None


def test_place_layers_checks_memory(model):
    layer = sum(p.numel() * p.element_size() for p in model.llm.layers[0].parameters())
    with pytest.raises(ValueError, match="needs .* bytes"):
        place_layers(model, ["cpu", "cpu"], memory=[layer // 2, layer // 2])
    with pytest.raises(ValueError, match="2 devices"):
        place_layers(model, ["cpu", "cpu"], memory=[1])
    with pytest.raises(ValueError, match="at least one"):
        place_layers(model, [])
