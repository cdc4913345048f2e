"""Quantized layers take int8 rows straight from the fused (residual add +) RMSNorm / SiLU*mul kernels.

The fused path must compute exactly what the unfused one does (norm or SiLU*mul in fp32, then
the per-token quantizer), so an fp32 model's outputs are bit-identical either way.
"""

import pytest
import torch

from qoq.config import G128, PER_CHANNEL, ModelConfig, QuantConfig
from qoq.bench.random_model import random_model
from qoq.layers.activation import QuantizedActivation
from qoq.layers.quant_linear import QuantLinear

TINY = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128,
                            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "max_position_embeddings": 64})


@pytest.mark.parametrize("precision, group", [("w4a8kv4", G128), ("w4a8kv8", PER_CHANNEL), ("w8a8kv8", G128)])
def test_fused_quantization_equals_the_unfused_path(monkeypatch, precision, group):
    model = random_model(TINY, QuantConfig(precision, group), device="cpu", dtype=torch.float32, seed=3)
    for layer in model.layers:  # non-trivial norm weights, so folding them in is exercised
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, TINY.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))

    seen = []
    original = QuantLinear.forward

    def spy(self, x):
        seen.append(isinstance(x, QuantizedActivation))
        return original(self, x)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    with torch.no_grad():
        fused = model(ids)
        # qkv, gate_up (after the norms) and down (after SiLU*mul) get int8 rows; o_proj does not.
        assert seen[:4] == [True, False, True, True]
        monkeypatch.setattr(QuantLinear, "accepts_int8", False)
        unfused = model(ids)
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("precision, group", [("w4a8kv4", G128), ("w4a8kv4", PER_CHANNEL)])
def test_silu_mul_in_the_gemm_epilogue_path(monkeypatch, precision, group):
    """Where the gate/up GEMM fuses SiLU*mul (W4 on Hopper at large M; forced here on the CPU,
    where the reference GEMM computes the same product), the MLP hands down_proj the [M, I]
    product and the model's output matches the unfused path up to that product's fp16 rounding."""
    from qoq.kernels import int_gemm

    model = random_model(TINY, QuantConfig(precision, group), device="cpu", dtype=torch.float32, seed=5)
    ids = torch.randint(0, TINY.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unfused = model(ids)
        calls = []
        original = QuantLinear.forward

        def spy(self, x, silu_mul=False):
            calls.append(silu_mul)
            return original(self, x, silu_mul=silu_mul)

        monkeypatch.setattr(QuantLinear, "forward", spy)
        monkeypatch.setattr(int_gemm, "fused_silu_mul", lambda *args: True)
        fused = model(ids)
    assert calls[:4] == [False, False, True, False]  # qkv, o, gate_up (fused), down
    assert (fused - unfused).abs().max() <= 2e-3 * unfused.abs().max()


@pytest.mark.parametrize("precision, group", [("w4a8kv4", G128), ("w4a8kv8", PER_CHANNEL), ("w8a8kv8", G128)])
def test_gemms_quantizing_their_own_rows_match_the_row_kernels(monkeypatch, precision, group):
    """At decode-sized batches (forced here on the CPU, where the Triton kernel runs under the
    interpreter) the norms defer into qkv and gate/up, whose GEMMs quantize the rows themselves,
    o_proj quantizes its plain input the same way, and the residual sums the deferred norms write
    are what the row kernels write: the model's output matches the row-kernel path up to the
    reordered sum of squares (a code off by one at most, rarely). The batch-invariant mode keeps
    the row kernels."""
    from qoq.engine.batch_invariant import PerRowLinears
    from qoq.kernels import int_gemm
    from qoq.layers import quant_linear
    from qoq.layers.activation import DeferredActivation

    model = random_model(TINY, QuantConfig(precision, group), device="cpu", dtype=torch.float32, seed=7)
    for layer in model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    kinds = []
    original = QuantLinear.forward

    def spy(self, x, silu_mul=False):
        kinds.append(type(x).__name__)
        return original(self, x, silu_mul=silu_mul)

    with torch.no_grad():
        rows = model(ids)
        monkeypatch.setattr(QuantLinear, "forward", spy)
        monkeypatch.setattr(quant_linear, "use_triton", lambda t: True)  # the GEMM twins still dispatch to torch
        monkeypatch.setenv("QOQ_ACT_PROLOGUE", "1")  # every quantizing plan
        monkeypatch.setattr(int_gemm, "quantizes_input", lambda m, n, k, mode, device: m <= 8)
        fused = model(ids)
        assert kinds[:4] == [DeferredActivation.__name__, "Tensor", DeferredActivation.__name__, "QuantizedActivation"]
        kinds.clear()
        with PerRowLinears():
            again = model(ids)
        assert kinds[:4] == ["QuantizedActivation", "Tensor", "QuantizedActivation", "QuantizedActivation"]
    assert torch.equal(again, rows)
    assert (fused - rows).abs().max() <= 2e-2 * rows.abs().max()


@pytest.mark.parametrize("precision, group", [("w4a8kv4", G128), ("w4a8kv8", PER_CHANNEL), ("w8a8kv8", G128)])
@pytest.mark.parametrize("prologue", [False, True])
def test_decode_sized_gemms_on_the_gemv_kernel_match_the_twins(monkeypatch, precision, group, prologue):
    """A table naming the CUDA-core gemv kernel for a few tokens (forced here for every GEMM of M
    <= 4; the Triton kernels under the interpreter): the model's output is the torch twins', with
    the row kernels quantizing the GEMMs' input or (the plans' quantize_input) the gemv kernel itself."""
    from qoq.kernels import gemm_plan, int_gemm
    from qoq.kernels.gemm_plan import GemmPlan

    model = random_model(TINY, QuantConfig(precision, group), device="cpu", dtype=torch.float32, seed=5)
    ids = torch.randint(0, TINY.vocab_size, (1, 3), generator=torch.Generator().manual_seed(4))
    used = []
    real = int_gemm.select_plan

    def gemv_below_five(m, n, k, mode, device):  # prologue: the plan says the GEMM quantizes its rows
        plan = GemmPlan("gemv", 1, 32, split_k=2, quantize_input=prologue) if m <= 4 else real(m, n, k, mode, device)
        used.append(plan.kernel)
        return plan

    with torch.no_grad():
        want = model(ids)
        monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
        monkeypatch.delenv("QOQ_ACT_PROLOGUE", raising=False)
        monkeypatch.setattr(int_gemm, "select_plan", gemv_below_five)
        if prologue:  # (int_gemm asks the plan on a GPU only)
            monkeypatch.setattr(int_gemm, "quantizes_input",
                                lambda m, n, k, mode, device: gemm_plan.quantizes_input(gemv_below_five(m, n, k, mode,
                                                                                                        device), m))
        acts = []
        real_act = int_gemm.int8_gemm_act_triton
        monkeypatch.setattr(int_gemm, "int8_gemm_act_triton", lambda *a, **kw: acts.append(1) or real_act(*a, **kw))
        got = model(ids)
    assert used and set(used) == {"gemv"}
    assert bool(acts) == prologue  # the plans' word decides which GEMMs quantize their rows
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_batch_invariant_mode_runs_the_quantized_gemms_row_by_row(monkeypatch):
    """GEMM plans differ by M (here split-K 4 at one token, whole at more, as GPU tables do), and
    split-K sums fp32 partials: under the batch-invariant mode a quantized linear gives each row
    exactly what that row gives alone (without it, some outputs differ in their last bit)."""
    from qoq.engine.batch_invariant import PerRowLinears
    from qoq.kernels import int_gemm
    from qoq.kernels.gemm_plan import GemmPlan

    wide = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128,
                                "intermediate_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "max_position_embeddings": 64})
    model = random_model(wide, QuantConfig("w4a8kv4", G128), device="cpu", dtype=torch.float32, seed=6)
    layer = model.layers[0].mlp.down_proj  # K = 1024: eight chunks, two per split at M = 1
    monkeypatch.setenv("QOQ_FORCE_TRITON", "1")
    monkeypatch.setattr(int_gemm, "select_plan", lambda m, n, k, mode, device: GemmPlan(
        "reg_a", 8 if m == 1 else 16, 64, split_k=4 if m == 1 else 1))
    x = torch.randn(16, layer.in_features, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        with PerRowLinears():
            batch = layer(x)
            alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
        plain = layer(x)
    assert torch.equal(batch, alone)
    assert not torch.equal(plain, alone)  # the batch's plan does round differently
