"""Every fast op against its reference on fresh random inputs, and the model on every backend.

Bounds (max |fast - reference| / max |reference|, per output):
- fp32, and bf16 inputs where both sides compute in fp32 (scan, state update, fused decode's SSM):
  ``FP32_REL`` = 1e-5; the kernels differ from torch only in summation order and a 1-ulp exp.
- outputs rounded to bf16 (conv, linear, RMSNorm in bf16): ``BF16_REL`` = 1e-2, a few bf16 ulps
  (2^-8 = 3.9e-3 relative), since one rounding can land on the other side of a tie.
- conv and SSM states: exact (a conv state is a copy of inputs) or ``FP32_REL``.
No timing assertions: the benchmark (benchmarks/bench.py) is where speed is judged.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

from jamba_core import ops
from jamba_core.ops import cpu, reference

FP32_REL = 1e-5
BF16_REL = 1e-2
DTYPES = [torch.float32, torch.bfloat16]

needs_cpu = pytest.mark.skipif(not cpu.available(), reason=f"fast CPU kernels: {cpu.status()}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def scan_inputs(b, d, L, N, dtype, seed, token_major=True):
    """Random scan inputs in the model's layouts: x, z, delta as (b, d, L) views of (b, L, d) buffers
    (``token_major``) or contiguous (b, d, L); a nonzero starting state."""
    g = torch.Generator().manual_seed(seed)

    def act(scale=1.0):
        t = torch.randn(b, L, d, generator=g) * scale
        return t.transpose(1, 2) if token_major else t.transpose(1, 2).contiguous()

    x, z = act().to(dtype), act().to(dtype)
    delta = F.softplus(act() - 2.0)  # fp32, as the model passes it
    A = -torch.exp(torch.randn(d, N, generator=g) * 0.5 + 0.5)
    B = torch.randn(b, L, N, generator=g).to(dtype)
    C = torch.randn(b, L, N, generator=g).to(dtype)
    D = torch.randn(d, generator=g)
    state = torch.randn(b, d, N, generator=g)
    return x, delta, A, B, C, D, z, state


# -- selective scan --------------------------------------------------------------------------------
SCAN_SHAPES = [  # (batch, d_inner, L, d_state): d not a multiple of the channel block (4, 8 or 16 lanes), L of anything
    (1, 1024, 1, 16),
    (2, 40, 37, 16),
    (3, 17, 5, 5),
    (2, 48, 300, 16),  # longer than the reference's 256-token block
    (1, 24, 2, 8),
    (2, 13, 9, 64),  # under one block of 8; the largest state
]


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SCAN_SHAPES)
@pytest.mark.parametrize("token_major", [True, False])
def test_selective_scan_matches_reference(shape, dtype, token_major):
    inputs = scan_inputs(*shape, dtype, seed=hash((shape, token_major)) % 2**31, token_major=token_major)
    *args, state = inputs
    s_ref, s_fast = state.clone(), state.clone()
    y_ref = reference.selective_scan(*args, s_ref)
    y_fast = cpu.selective_scan(*args, s_fast)
    assert y_fast.shape == y_ref.shape and y_fast.dtype == torch.float32
    assert rel(y_fast, y_ref) <= FP32_REL
    assert rel(s_fast, s_ref) <= FP32_REL


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_scan_with_fused_softplus_matches_reference(dtype):
    """delta given raw (dt_proj output, model dtype) with delta_bias and delta_softplus: the kernel's
    softplus (exp, log1p) against F.softplus, over the range where its two branches and log1p's
    correction matter (raw values from -30 to 30)."""
    x, _, A, B, C, D, z, state = scan_inputs(2, 40, 37, 16, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    raw = (torch.rand(2, 37, 40, generator=g) * 60 - 30).to(dtype).transpose(1, 2)
    bias = torch.randn(40, generator=g)
    s_ref, s_fast = state.clone(), state.clone()
    delta = F.softplus(raw.float() + bias[None, :, None])
    y_ref = reference.selective_scan(x, delta, A, B, C, D, z, s_ref)
    y_fast = cpu.selective_scan(x, raw, A, B, C, D, z, s_fast, delta_bias=bias, delta_softplus=True)
    assert rel(y_fast, y_ref) <= FP32_REL
    assert rel(s_fast, s_ref) <= FP32_REL
    with ops.using("reference"):  # the dispatch composes the same for a backend without the fusion
        s_disp = state.clone()
        assert rel(ops.selective_scan(x, raw, A, B, C, D, z, s_disp, delta_bias=bias, delta_softplus=True), y_ref) == 0.0


@needs_cpu
def test_selective_scan_in_pieces_equals_whole():
    *args, state = scan_inputs(2, 40, 101, 16, torch.float32, seed=7)
    x, delta, A, B, C, D, z = args
    whole_state = state.clone()
    whole = cpu.selective_scan(x, delta, A, B, C, D, z, whole_state)
    piece_state = state.clone()
    parts = [cpu.selective_scan(x[..., s:e], delta[..., s:e], A, B[:, s:e], C[:, s:e], D, z[..., s:e], piece_state)
             for s, e in [(0, 1), (1, 3), (3, 50), (50, 101)]]
    assert rel(torch.cat(parts, -1), whole) <= FP32_REL
    assert rel(piece_state, whole_state) <= FP32_REL


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,d,N", [(1, 1024, 16), (3, 40, 16), (2, 33, 8), (1, 20, 3)])
def test_selective_state_update_matches_reference(batch, d, N, dtype):
    x, delta, A, B, C, D, z, state = scan_inputs(batch, d, 1, N, dtype, seed=d * N)
    args = (x[:, :, 0], delta[:, :, 0], A, B[:, 0], C[:, 0], D, z[:, :, 0])
    s_ref, s_fast = state.clone(), state.clone()
    y_ref = reference.selective_state_update(*args, s_ref)
    y_fast = cpu.selective_state_update(*args, s_fast)
    assert y_fast.shape == y_ref.shape == (batch, d)
    assert rel(y_fast, y_ref) <= FP32_REL
    assert rel(s_fast, s_ref) <= FP32_REL


# -- causal conv -----------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 2, 3, 37])  # 1 and 2 are shorter than d_conv - 1 = 3
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv1d_matches_reference(L, K, dtype, bias):
    g = torch.Generator().manual_seed(L * 10 + K)
    b, d = 2, 37
    x = torch.randn(b, L, d, generator=g).to(dtype).transpose(1, 2)  # the model's (b, d, L) view
    w = torch.randn(d, K, generator=g).to(dtype)
    bvec = torch.randn(d, generator=g).to(dtype) if bias else None
    state = torch.randn(b, d, K - 1, generator=g).to(dtype)  # a conv that continues earlier tokens
    bound = FP32_REL if dtype == torch.float32 else BF16_REL
    s_ref, s_fast, s_silu = state.clone(), state.clone(), state.clone()
    out_ref = reference.causal_conv1d(x, w, bvec, s_ref)
    out_fast = cpu.causal_conv1d(x, w, bvec, s_fast)
    assert out_fast.shape == out_ref.shape and out_fast.dtype == dtype
    assert rel(out_fast, out_ref) <= bound
    assert torch.equal(s_fast, s_ref)
    assert rel(cpu.causal_conv1d_silu(x, w, bvec, s_silu), F.silu(out_ref)) <= bound
    assert torch.equal(s_silu, s_ref)


# -- linear, RMSNorm -------------------------------------------------------------------------------
@pytest.fixture(params=[1, 4], ids=["1-stream", "4-streams"])
def bf16_streams(request):
    """Both settings of the bf16 GEMVs' row streams per thread (`cpu.set_bf16_gemv_streams`), whichever this
    CPU chose when the kernels loaded; restored after."""
    before = cpu.set_bf16_gemv_streams(0)  # 0: read the setting
    cpu.set_bf16_gemv_streams(request.param)
    yield request.param
    cpu.set_bf16_gemv_streams(before)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N,K", [(1, 100, 37), (1, 4099, 512), (3, 64, 1024), (4, 7, 16), (9, 50, 40), (16, 33, 64), (17, 8, 8),
                                      (1, 1, 48), (2, 2, 40), (1, 3, 96), (1, 5, 32), (1, 9, 200)])  # blocks of 1-4 rows (RowStreams)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(rows, N, K, dtype, bias, bf16_streams):
    g = torch.Generator().manual_seed(rows * N + K)
    x = torch.randn(rows, 1, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    bvec = torch.randn(N, generator=g).to(dtype) if bias else None
    expected = F.linear(x.float(), w.float(), None if bvec is None else bvec.float())  # exact products, fp32 sums
    got = cpu.linear(x, w, bvec)
    assert got.shape == (rows, 1, N) and got.dtype == dtype
    assert rel(got, expected) <= (FP32_REL if dtype == torch.float32 else BF16_REL)


@needs_cpu
def test_bf16_gemv_streams_setting(monkeypatch):
    """The bf16 GEMVs read 1 or 4 row streams per thread, as $JAMBA_LOCAL_BF16_STREAMS says or as measured
    ("auto"); the library takes 1 or 4 and keeps its setting for any other value."""
    lib = cpu._lib()
    before = cpu.set_bf16_gemv_streams(0)
    assert before in (1, 4)
    try:
        for mode in ("1", "4"):
            monkeypatch.setenv("JAMBA_LOCAL_BF16_STREAMS", mode)
            assert cpu.bf16_gemv_streams(lib) == int(mode)
        monkeypatch.setenv("JAMBA_LOCAL_BF16_STREAMS", "auto")
        assert cpu.bf16_gemv_streams(lib) in (1, 4)
        assert cpu.set_bf16_gemv_streams(0) == 1  # the measurement leaves one stream
        assert cpu.set_bf16_gemv_streams(4) == 4 and cpu.set_bf16_gemv_streams(3) == 4
    finally:
        cpu.set_bf16_gemv_streams(before)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 40, 64), (1, 300, 37)])
def test_bf16_linear_upcast_matches_torch(monkeypatch, shape, bias):
    """bf16 linears of many rows on a CPU whose bf16 GEMM is slow run in fp32 on upcast copies, in blocks
    of output features (here 7 rows of weights a block, N not a multiple of it): within bf16 rounding of
    the exact-product fp32 result, as torch's bf16 linear is; "native" is torch's own."""
    g = torch.Generator().manual_seed(7)
    b, L, K = shape
    x = torch.randn(b, L, K, generator=g).bfloat16()
    w = torch.randn(45, K, generator=g).bfloat16()
    bvec = torch.randn(45, generator=g).bfloat16() if bias else None
    expected = F.linear(x.float(), w.float(), None if bvec is None else bvec.float())
    monkeypatch.setattr(cpu, "UPCAST_BLOCK_ELEMENTS", 7 * K)
    monkeypatch.setenv("JAMBA_LOCAL_BF16_MATMUL", "upcast")
    got = cpu.linear(x, w, bvec)
    assert got.shape == (b, L, 45) and got.dtype == torch.bfloat16
    assert rel(got, expected) <= BF16_REL
    monkeypatch.setenv("JAMBA_LOCAL_BF16_MATMUL", "native")
    assert torch.equal(cpu.linear(x, w, bvec), F.linear(x, w, bvec))
    monkeypatch.setenv("JAMBA_LOCAL_BF16_MATMUL", "auto")
    monkeypatch.setattr(cpu, "_bf16_choice", {})
    assert cpu.bf16_matmul_upcast() in (True, False)
    assert list(cpu._bf16_choice) == [torch.get_num_threads()]  # measured once per thread count


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N,K", [(1, 100, 37), (1, 4099, 512), (3, 64, 1024), (5, 7, 16), (31, 50, 40), (2, 33, 15),
                                      (1, 9, 16384 + 160 + 37), (2, 5, 3 * 16384 + 96)])
def test_int8_matmul_matches_the_dequantized_fp32_product(rows, N, K, dtype):
    """K past the VNNI kernel's int32 blocks (8192 weights) and with 32-wide and 1-wide tails; bound: fp32's."""
    g = torch.Generator().manual_seed(rows * N + K)
    x = torch.randn(rows, K, generator=g).to(dtype)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) * 0.02 + 1e-3
    expected = F.linear(x.float(), q.float() * scale[:, None])  # exact products, fp32 sums
    got = cpu.int8_matmul(x, q, scale)
    assert got.shape == (rows, N) and got.dtype == dtype
    assert rel(got, expected) <= (FP32_REL if dtype == torch.float32 else BF16_REL)
    assert cpu.int8_matmul(torch.randn(cpu.MAX_INT8_GEMV_ROWS + 1, K).to(dtype), q, scale) is None  # prefill: not this kernel


@needs_cpu
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float32, torch.bfloat16),  # the fp32 residual stream, bf16 weights
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 1, 512), (2, 37, 64), (1, 300, 16)])
def test_rms_norm_matches_reference(shape, dtype, wdtype):
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(wdtype)
    got, expected = cpu.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert rel(got, expected) <= (FP32_REL if expected.dtype == torch.float32 else BF16_REL)


# -- the fused Mamba decode step, through the mixer --------------------------------------------------
def _mixer(dtype, seed=0, **overrides):
    from jamba_core.model.mamba import MambaMixer
    from jamba_core.testing import make_config

    config = make_config("tiny", **{"hidden_size": 48, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_proj_bias": True, **overrides})
    torch.manual_seed(seed)
    mixer = MambaMixer(config)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.endswith("dt_proj.bias"):
                p.uniform_(-5.0, -2.0)
            elif name == "A_log":
                p.add_(torch.rand_like(p) * 0.5)
            elif not name.endswith(".D"):
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return mixer.to(dtype).requires_grad_(False), config


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", [{}, dict(mamba_d_conv=2, mamba_d_state=8), dict(mamba_conv_bias=False, mamba_dt_rank=5), dict(mamba_dt_rank=21),
                                       dict(hidden_size=44, mamba_dt_rank=3, mamba_d_state=20),  # d_in 88: 5.5 blocks of 16 channels
                                       dict(hidden_size=42, mamba_d_state=12)])  # d_in 84: 10.5 blocks of 8
def test_fused_decode_step_matches_separate_ops(dtype, overrides):
    from jamba_core.cache import MambaState

    mixer, config = _mixer(dtype, **overrides)
    mixer.A_log.data = mixer.A_log.data.float()
    mixer.D.data = mixer.D.data.float()
    batch = 2
    x = torch.randn(batch, 20, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    states = {}
    outs = {}
    for backend in ("reference", "cpu"):
        with ops.using(backend), torch.inference_mode():
            st = MambaState(batch, mixer.d_in, mixer.d_conv, mixer.d_state, dtype, "cpu")
            mixer(x[:, :3], st, None)  # a prefix shorter than nothing in particular, then decode
            outs[backend] = torch.cat([mixer(x[:, t : t + 1], st, None) for t in range(3, 20)], 1)
            states[backend] = st
    bound = FP32_REL if dtype == torch.float32 else BF16_REL
    assert rel(outs["cpu"], outs["reference"]) <= bound * 10  # 17 steps of state carried through the same ops
    assert rel(states["cpu"].ssm, states["reference"].ssm) <= bound * 10
    assert rel(states["cpu"].conv, states["reference"].conv) <= bound


# -- the fused feed-forward decode, through the modules ----------------------------------------------
@needs_cpu
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("moe", [True, False])
def test_fused_feed_forward_decode_matches_the_modules_ops(weights, tokens, moe, bf16_streams):
    """MoE (router, top-2 of 5 experts) and dense MLP on a few tokens: the one-call kernel against the
    modules' own ops on the reference backend. Odd widths (hidden 40, intermediate 70) leave tails in
    every row block. int8: the reference runs torch's int8 kernel with bf16 activations, hence its bound."""
    from jamba_core.model.moe import MLP, SparseMoE
    from jamba_core.quant import quantize_model
    from jamba_core.testing import make_config

    config = make_config("tiny", hidden_size=40, intermediate_size=70, num_experts=5, num_experts_per_tok=2)
    torch.manual_seed(tokens)
    module = SparseMoE(config) if moe else MLP(40, 70)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    module = module.to(dtype).requires_grad_(False)
    if weights == "int8":
        wrapper, layer = torch.nn.Module(), torch.nn.Module()  # quantize_model targets "*.feed_forward.*_proj"
        wrapper.layer, layer.feed_forward = layer, module
        quantize_model(wrapper, "int8")
        assert type(module.experts[0].gate_proj if moe else module.gate_proj).__name__ == "Int8Linear"
    x = torch.randn(tokens, 1, 40, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.inference_mode():
        with ops.using("reference"):
            expected = module(x)
        with ops.using("cpu"):
            got = module(x)
            experts = [m.decode_weights() for m in (module.experts if moe else [module])]
            direct = cpu.ffn_decode(x[:, 0], module.router.weight if moe else None, experts, 2 if moe else 1)
    assert direct is not None and torch.equal(direct, got[:, 0])  # the module ran the kernel
    if weights != "int8":  # trainable weights: autograd must see the ops, so the module does not take the kernel
        module.requires_grad_(True)
        with ops.using("cpu"):
            y = module(x)
        y.float().sum().backward()
        if moe:  # the router, and the experts the tokens were routed to
            assert module.router.weight.grad is not None
            assert any(e.gate_proj.weight.grad is not None for e in module.experts)
        else:
            assert module.gate_proj.weight.grad is not None
    assert got.shape == expected.shape and got.dtype == expected.dtype
    bound = {"float32": FP32_REL, "bfloat16": BF16_REL, "int8": BF16_REL}[weights]
    assert rel(got, expected) <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_prefill_pads_expert_groups_only_for_onednn_dtypes(monkeypatch, dtype):
    """bf16 prefill pads each expert's token group to a multiple of `moe.GROUP_ROWS` rows (a few recurring
    matmul shapes for oneDNN instead of a new one per group); the padding rows are dropped, so the output
    equals the unpadded computation to bf16 rounding, and fp32 is not padded at all."""
    from jamba_core.model import moe
    from jamba_core.testing import make_config

    config = make_config("tiny", hidden_size=48, intermediate_size=80, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    module = moe.SparseMoE(config).to(dtype).requires_grad_(False)
    x = torch.randn(1, 75, 48, generator=torch.Generator().manual_seed(1)).to(dtype)  # groups of ~37 rows
    rows = []
    for e in module.experts:
        monkeypatch.setattr(e, "forward", lambda h, f=e.forward: rows.append(h.shape[0]) or f(h))
    with torch.inference_mode():
        padded = module(x)
        counts, rows[:] = rows[:], []
        monkeypatch.setattr(moe, "GROUP_ROWS", 1)
        plain = module(x)
    assert sum(rows) == 75 * 2 and len(counts) == len(rows)
    if dtype == torch.bfloat16:
        assert all(n % 16 == 0 or n <= moe.DECODE_TOKENS for n in counts) and counts != rows
        assert rel(padded, plain) <= BF16_REL
    else:
        assert counts == rows and torch.equal(padded, plain)


def test_onednn_shape_caches_are_capped_on_import_unless_set():
    """Importing jamba_core caps PyTorch's oneDNN shape caches (LRU_CACHE_CAPACITY and
    ONEDNN_PRIMITIVE_CACHE_CAPACITY: 1,024 entries each by default, ~260 KiB per bf16 matmul shape) and
    keeps a value the user has set."""
    import subprocess
    import sys

    code = "import os, jamba_core; print(os.environ['LRU_CACHE_CAPACITY'], os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split() == ["64", "64"]
    env["LRU_CACHE_CAPACITY"] = "8"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split() == ["8", "64"]


# -- whole decoder layers in one call, through the modules --------------------------------------------
def random_layer(config, i: int, weights: str, seed: int):
    """Decoder layer ``i`` with random weights (norm weights 0.5-1.5, the rest N(0, 0.3)) in ``weights``
    ("float32", "bfloat16", "int8": fp32 with int8 feed-forward projections, "int8+mamba": and int8 Mamba
    in/out projections), frozen; and its dtype."""
    from jamba_core.model.jamba import DecoderLayer
    from jamba_core.quant import quantize_model

    torch.manual_seed(seed)
    layer = DecoderLayer(config, i)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.3)
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    layer = layer.to(dtype).requires_grad_(False)
    if weights.startswith("int8"):
        wrapper = torch.nn.Module()
        wrapper.layer = layer
        quantize_model(wrapper, weights)
    return layer, dtype


@needs_cpu
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int8+mamba"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("moe", [True, False])
def test_mamba_layer_decode_matches_the_modules_bit_for_bit(monkeypatch, weights, tokens, moe):
    """A Mamba decoder layer (MoE with top-2 of 5 experts, or a dense MLP) on one token per sequence from
    random conv and SSM states: the one-call layer kernel against the same layer's modules on the same
    backend (the same kernels one by one: equal outputs and states), and against the reference backend.
    Odd widths: hidden 40, intermediate 70, d_inner 80, d_state 12, dt_rank 5."""
    from jamba_core.cache import MambaState
    from jamba_core.config import is_attention_layer, is_moe_layer
    from jamba_core.model.jamba import DecoderLayer
    from jamba_core.testing import make_config

    config = make_config("tiny", hidden_size=40, intermediate_size=70, num_experts=5, num_experts_per_tok=2,
                         mamba_d_state=12, mamba_dt_rank=5)
    i = next(i for i in range(config.num_hidden_layers) if not is_attention_layer(config, i) and is_moe_layer(config, i) == moe)
    layer, dtype = random_layer(config, i, weights, seed=tokens)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, 1, 40, generator=gen)
    state = MambaState(tokens, 80, config.mamba_d_conv, 12, dtype, "cpu")
    state.conv.copy_(torch.randn(state.conv.shape, generator=gen))
    state.ssm.copy_(torch.randn(state.ssm.shape, generator=gen))

    def run(backend, fused=True):
        s = MambaState(tokens, 80, config.mamba_d_conv, 12, dtype, "cpu")
        s.conv.copy_(state.conv)
        s.ssm.copy_(state.ssm)
        with monkeypatch.context() as m, torch.inference_mode(), ops.using(backend):
            if not fused:
                m.setattr(DecoderLayer, "_fused_decode", lambda self, x, s: None)
            return layer(x, s, None, None), s

    calls = []
    monkeypatch.setattr(cpu, "mamba_layer_decode", lambda *a, f=cpu.mamba_layer_decode: calls.append(1) or f(*a))
    got, got_state = run("cpu")
    assert calls, "the layer kernel did not run"
    modules, modules_state = run("cpu", fused=False)
    assert torch.equal(got, modules) and torch.equal(got_state.ssm, modules_state.ssm) and torch.equal(got_state.conv, modules_state.conv)
    expected, expected_state = run("reference")
    bound = FP32_REL if weights == "float32" else BF16_REL
    assert rel(got, expected) <= bound and rel(got_state.ssm, expected_state.ssm) <= bound


@needs_cpu
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("past", [4, 700])
def test_attention_layer_decode_matches_the_modules(monkeypatch, weights, tokens, past):
    """An attention decoder layer (GQA: 4 query heads on 2 KV heads, head_dim 10) on one token per
    sequence after ``past`` cached positions (700: the keys split across threads): the one-call kernel
    against the same layer's modules (scaled_dot_product_attention), and the K/V it writes equal to theirs."""
    from jamba_core.cache import KVCache
    from jamba_core.config import is_attention_layer
    from jamba_core.model.jamba import DecoderLayer
    from jamba_core.testing import make_config

    config = make_config("tiny", hidden_size=40, intermediate_size=70, num_attention_heads=4, num_key_value_heads=2,
                         num_experts=5, num_experts_per_tok=2)
    i = next(i for i in range(config.num_hidden_layers) if is_attention_layer(config, i))
    layer, dtype = random_layer(config, i, weights, seed=past + tokens)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, 1, 40, generator=gen)
    past_k, past_v = (torch.randn(tokens, 2, past, 10, generator=gen).to(dtype) for _ in range(2))

    def run(fused):
        kv = KVCache(tokens, 2, 10, dtype, "cpu")
        kv.update(past_k, past_v)
        with monkeypatch.context() as m, torch.inference_mode(), ops.using("cpu"):
            if not fused:
                m.setattr(DecoderLayer, "_fused_decode", lambda self, x, s: None)
            return layer(x, kv, None, None), kv

    calls = []
    monkeypatch.setattr(cpu, "attention_layer_decode", lambda *a, f=cpu.attention_layer_decode: calls.append(1) or f(*a))
    monkeypatch.setattr(cpu, "_threads", lambda work=None: 2)  # these sizes would run serially: test the merge
    got, got_kv = run(True)
    assert calls, "the layer kernel did not run"
    expected, expected_kv = run(False)
    assert got_kv.length == expected_kv.length == past + 1
    assert torch.equal(got_kv.k[:, :, : past + 1], expected_kv.k[:, :, : past + 1])
    assert torch.equal(got_kv.v[:, :, : past + 1], expected_kv.v[:, :, : past + 1])
    assert rel(got, expected) <= (FP32_REL if weights == "float32" else BF16_REL)


@needs_cpu
def test_mamba_layer_decode_follows_the_layers_weights_and_leaves_autograd_and_biased_int8_to_the_modules(monkeypatch):
    from jamba_core.cache import MambaState
    from jamba_core.model.jamba import DecoderLayer
    from jamba_core.quant import quantize_model
    from jamba_core.testing import make_config

    config = make_config("tiny")
    layer = DecoderLayer(config, 0)
    assert not layer.is_attention
    x = torch.randn(1, 1, config.hidden_size)

    def state():
        return MambaState(1, layer.mamba.d_in, config.mamba_d_conv, config.mamba_d_state, torch.float32, "cpu")

    with ops.using("cpu"):
        assert layer._fused_decode(x, state()) is None  # trainable: autograd sees the ops
        layer.requires_grad_(False)
        with torch.inference_mode():
            assert layer._fused_decode(x, state()) is not None
            # weights reassigned after the plan was made: the kernel follows them
            layer.mamba.out_proj.weight.data = torch.randn_like(layer.mamba.out_proj.weight)
            layer.feed_forward.down_proj.weight.data = torch.randn_like(layer.feed_forward.down_proj.weight)
            fused = layer._fused_decode(x, state())
            with monkeypatch.context() as m:
                m.setattr(DecoderLayer, "_fused_decode", lambda self, x, s: None)
                assert torch.equal(fused, layer(x, state(), None, None))
        layer.mamba.in_proj.bias = torch.nn.Parameter(torch.zeros(layer.mamba.in_proj.out_features), requires_grad=False)
        wrapper = torch.nn.Module()
        wrapper.layer = layer
        quantize_model(wrapper, "int8+mamba")
        with torch.inference_mode():
            assert layer._fused_decode(x, state()) is None  # an int8 projection with a bias: the modules run


def test_a_layers_plan_is_checked_at_each_new_cache_not_at_every_token(monkeypatch):
    """`DecoderLayer._fused_decode` checks its plan against the weights at the first step of each layer
    state (a cache), not per token; an in-place change is used from the next cache on."""
    from jamba_core.cache import MambaState
    from jamba_core.model import jamba
    from jamba_core.testing import make_config

    config = make_config("tiny")
    layer = jamba.DecoderLayer(config, 0).requires_grad_(False)
    x = torch.randn(1, 1, config.hidden_size)
    checks = []
    real = jamba._Snapshot.current
    monkeypatch.setattr(jamba._Snapshot, "current", lambda self: checks.append(1) or real(self))

    def state():
        return MambaState(1, layer.mamba.d_in, config.mamba_d_conv, config.mamba_d_state, torch.float32, "cpu")

    with ops.using("cpu"), torch.inference_mode():
        first, second = state(), state()
        for _ in range(4):
            assert layer._fused_decode(x, first) is not None
        assert len(checks) == 0  # the plan was made at the first step
        layer._fused_decode(x, second)
        layer._fused_decode(x, second)
        assert len(checks) == 1
        layer._fused_decode(x, first)  # states alternating: each switch checks
        assert len(checks) == 2
        layer.mamba.out_proj.weight.mul_(2.0)
        fresh = state()
        fused = layer._fused_decode(x, fresh)
        with monkeypatch.context() as m:
            m.setattr(jamba.DecoderLayer, "_fused_decode", lambda self, x, s: None)
            assert torch.equal(fused, layer(x, state(), None, None))


@pytest.mark.parametrize("change", ["clone", "share_memory"])
def test_weights_given_new_memory_mid_stream_make_a_new_plan_at_once(tiny_checkpoint, change):
    """Mid-stream, every parameter gets new memory with equal values (``p.data = clone``, as ``.to()``
    does; ``share_memory()``, which moves each storage in place) and the old memory is freed and scribbled
    over: the stream must go on with equal tokens (the layer compares its tensors' data pointers at every
    token and makes a new plan). With the whole check at each new cache only, the plans read freed memory
    (the huge-page mapping unmapped: SIGSEGV). In a child process, so that a crash fails this test only."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import gc, torch
        from jamba_core import Engine
        engine = Engine.from_pretrained({str(tiny_checkpoint)!r}, progress=False)
        prompt = "Call me Ishmael. Some years ago, never mind how long precisely"
        want = engine.generate(prompt, max_new_tokens=12).token_ids
        got = []
        for i, chunk in enumerate(engine.stream(prompt, max_new_tokens=12)):
            got += chunk.token_ids
            if i == 2:
                with torch.no_grad():
                    if {change!r} == "clone":
                        for p in engine.model.parameters():
                            p.data = p.data.clone()
                    else:
                        engine.model.share_memory()
                gc.collect()
                junk = [torch.full((1 << 16,), float("nan")) for _ in range(300)]
        print(got == want, got, want)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("True"), done.stdout


# -- fallback --------------------------------------------------------------------------------------
def test_a_failed_build_falls_back_to_the_reference(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_state", {"lib": None, "error": None, "tried": False})
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    with caplog.at_level("WARNING"):
        assert not cpu.available()
    assert "no C++ compiler" in cpu.status()
    assert any("unavailable" in r.message for r in caplog.records)
    *args, state = scan_inputs(1, 20, 9, 4, torch.float32, seed=3)
    s1, s2 = state.clone(), state.clone()
    assert torch.equal(cpu.selective_scan(*args, s1), reference.selective_scan(*args, s2))
    x = torch.randn(1, 1, 8)
    w = torch.randn(5, 8)
    assert torch.equal(cpu.linear(x, w), F.linear(x, w))
    assert torch.equal(cpu.rms_norm(x, torch.ones(8), 1e-6), ops.rms_norm_reference(x, torch.ones(8), 1e-6))


@needs_cpu
@pytest.mark.parametrize("K", [16384, 2 * 16384 + 128 + 32 + 5])
def test_int8_matmul_sums_without_overflow_at_the_extremes(K):
    """Weights at +-127 and activations all at the row's absmax: the int16 split's largest products, so
    each int32 lane of the VNNI kernel reaches its bound within a block; the sums are exact in fp64."""
    q = torch.full((4, K), 127, dtype=torch.int8)
    q[1] = -127
    q[2, ::2] = -127
    q[3] = torch.randint(-127, 128, (K,), generator=torch.Generator().manual_seed(K), dtype=torch.int8)
    scale = torch.tensor([1e-3, 2e-3, 0.5, 1.0])
    x = torch.full((2, K), 3.0)
    x[1, 1::2] = -3.0
    expected = (x.double() @ (q.double() * scale.double()[:, None]).T).float()
    assert rel(cpu.int8_matmul(x, q, scale), expected) <= FP32_REL


@needs_cpu
def test_int8_matmul_propagates_non_finite_activations():
    """inf / nan in x: the fp32 result (inf or nan in every output of that row), not a wrapped integer."""
    q = torch.randint(-127, 128, (8, 256), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    scale = torch.full((8,), 0.01)
    x = torch.randn(2, 256)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    got = cpu.int8_matmul(x, q, scale)
    assert torch.isnan(got[0]).all()
    assert not torch.isfinite(got[1]).any()
    y = cpu.int8_matmul(torch.zeros(1, 256), q, scale)
    assert torch.equal(y, torch.zeros(1, 8))  # an all-zero row: no 0 / 0 in the split's scale


@needs_cpu
@pytest.mark.parametrize("flag,feature,tests", [
    ("-mno-avx512bf16", "avx512_bf16", "test_linear_matches_torch or feed_forward_decode or layer_decode or flash_attention or bf16_chunked_prefill"),
    ("-mno-avx512vnni", "avx512_vnni", "int8_matmul or feed_forward_decode or layer_decode"),
], ids=["bf16", "int8"])
def test_matmuls_without_an_instruction_set_match_too(tmp_path, flag, feature, tests):
    """This CPU's build takes VDPBF16PS for bf16 weights and VPDPWSSD for int8 ones; the same tests on a
    build without the instruction set (the path of a CPU that lacks it), in a fresh process so that build is
    the one loaded."""
    if feature not in cpu._cpu_signature():
        pytest.skip(f"this CPU has no {feature}: the suite ran its fallback")
    _tests_pass_on_a_build_with(flag, f"({tests}) and not without_an_instruction_set", tmp_path)


@needs_cpu
def test_kernels_at_the_other_vector_widths_match_too(tmp_path):
    """The kernels' vectors have the register's width: 16 lanes with AVX-512, 8 with AVX / AVX2, 4 with SSE2
    or NEON (see cpu_kernels.cpp's W): the kernel tests and the training scan's on a build of each narrower
    width this CPU runs, made by turning its wider instruction sets off."""
    flags = set(cpu._cpu_signature().split())
    builds = (["-mno-avx512f"] if "avx512f" in flags else []) + (["-mno-avx"] if "avx" in flags else [])
    if not builds:
        pytest.skip("no AVX on this CPU: there is no narrower vector width to build")
    tests = ("(scan or conv or linear or int8_matmul or rms_norm or decode or flash or every_backend or bf16_chunked_prefill)"
             " and not (without_an_instruction_set or other_vector_width) or training_scan")
    for flag in builds:  # 8 lanes in ymm registers; 4 lanes in xmm registers (SSE2)
        _tests_pass_on_a_build_with(flag, tests, tmp_path / flag, lanes=8 if flag == "-mno-avx512f" else 4,
                                    extra_files=[os.path.join(os.path.dirname(__file__), "test_train.py")])


def _tests_pass_on_a_build_with(flag, tests, tmp_path, extra_files=(), lanes=None):
    """Run the tests ``-k tests`` in a fresh process whose kernels are built with ``flag`` added (so that
    build is the one loaded), in its own kernel cache; they must all pass, none skipped; ``lanes``: the
    vector width that build must report (`cpu.features`)."""
    import subprocess
    import sys

    env = dict(os.environ, JAMBA_LOCAL_CXXFLAGS=flag, JAMBA_LOCAL_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, *extra_files,
                           "-k", tests], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]
    assert list(tmp_path.glob("kernels/*.so")), f"the build with {flag} was not made"
    if lanes is not None:  # the build's own report (jl_features: lanes in bits 8-15)
        assert {ctypes.CDLL(str(so)).jl_features() >> 8 for so in tmp_path.glob("kernels/*.so")} == {lanes}


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.use("nonexistent")


# -- the model on every backend ----------------------------------------------------------------------
BACKENDS = ["reference"] + (["cpu"] if cpu.available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ops.using(request.param):
        yield request.param


def test_model_matches_transformers_on_every_backend(backend, tmp_path):
    from test_model_parity import CONFIGS, REL_BOUND, load_ours, max_rel, reference_model

    for name in ("attn-odd-moe-even", "dtrank7-dconv3-mqa-moe-every-layer"):
        ref = reference_model(CONFIGS[name])
        ours = load_ours(ref, tmp_path / name)
        ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert max_rel(ours(ids), ref(ids).logits) <= REL_BOUND


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_prefill_then_decode_on_every_backend(backend, chunk, tmp_path):
    from test_model_parity import CONFIGS, REL_BOUND, load_ours, max_rel, reference_model

    from jamba_core.cache import HybridCache

    ref = reference_model(CONFIGS["gqa4-top1-8experts"])
    ours = load_ours(ref, tmp_path)
    ids = torch.randint(0, 512, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits
        cache = HybridCache(ours.config)
        got = torch.cat([ours(ids[:, s : min(s + chunk, 60)], cache=cache) for s in range(0, 60, chunk)]
                        + [ours(ids[:, t : t + 1], cache=cache) for t in range(60, 70)], 1)
    assert max_rel(got, expected) <= REL_BOUND


def test_chunked_prefill_with_past_keys_in_blocks_matches_transformers(monkeypatch, tmp_path):
    """Long prompts attend to the past keys block by block (log-sum-exp merge); a tiny block here."""
    from test_model_parity import CONFIGS, REL_BOUND, load_ours, max_rel, reference_model

    from jamba_core.cache import HybridCache
    from jamba_core.model import attention

    monkeypatch.setattr(attention, "PAST_KEY_BLOCK", 7)
    ref = reference_model(CONFIGS["attn-odd-moe-even"])
    ours = load_ours(ref, tmp_path)
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = HybridCache(ours.config)
        got = torch.cat([ours(ids[:, s : s + 16], cache=cache) for s in range(0, 80, 16)], 1)
        assert max_rel(got, ref(ids).logits) <= REL_BOUND


@needs_cpu
def test_bf16_model_fast_path_close_to_reference_path(tmp_path):
    """bf16 weights: the fast path (fused decode, fp32 kernels) against the same model on the reference
    ops. Both round intermediates to bf16 at the same places; what differs is summation order, so the
    logits agree to a few bf16 ulps of the largest logit."""
    from test_model_parity import CONFIGS, load_ours, reference_model

    from jamba_core.cache import HybridCache
    from jamba_core.loading import load_config, load_model

    ref = reference_model(CONFIGS["attn-odd-moe-even"])
    load_ours(ref, tmp_path)
    model = load_model(tmp_path, load_config(tmp_path), dtype=torch.bfloat16, progress=False)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name in ("reference", "cpu"):
        with ops.using(name), torch.no_grad():
            cache = HybridCache(model.config, dtype=torch.bfloat16)
            prefill = model(ids[:, :30], cache=cache)
            steps = [model(ids[:, t : t + 1], cache=cache) for t in range(30, 40)]
            logits[name] = torch.cat([prefill] + steps, 1).float()
    assert rel(logits["cpu"], logits["reference"]) <= BF16_REL


# -- prefill attention over past keys: the bf16 flash kernel -----------------------------------------
def _kernel_has_avx512() -> bool:
    """Whether the loaded build has the fp32 flash kernel (asked of the build: a CPU with AVX-512 runs a build
    without it under the other-width and instruction-set tests)."""
    return cpu.features()["avx512"]


def _kernel_has_bf16_flash() -> bool:
    return cpu.features()["avx512_bf16"]


@needs_cpu
@pytest.mark.parametrize("b,kv,R,S,hd", [
    (1, 2, 37, 100, 64),     # rows not a multiple of the tile (16 rows fp32, 8 bf16), keys not of the 256-key block
    (2, 1, 8, 256, 32),      # batch > 1, exact blocks
    (1, 3, 19, 1, 128),      # a single key
    (1, 2, 64, 2100, 48),    # past one 2048-key pass; head_dim 48: one block of 3 vectors
    (1, 1, 5, 4099, 16),     # three passes, the last of 3 keys
    (1, 2, 9, 300, 80),      # head_dim 80: one block of 4 vectors and one of 1
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_lse_matches_reference(b, kv, R, S, hd, dtype, monkeypatch):
    """q, k, v (k, v strided views of a larger cache, as the KV cache hands them over) against the fp32
    softmax on the same values. Bounds on out (relative, Frobenius): fp32 1e-5 (summation order, a degree-6
    exp2 within 2e-7); bf16 4e-3, P being rounded to bf16 (2^-9 relative per weight) before P.V. On the
    log-sum-exp: 2e-6 relative (fp32 sums). Our bf16 kernel even where torch's is the faster one here."""
    monkeypatch.setenv("JAMBA_LOCAL_BF16_FLASH", "ours")
    g = torch.Generator().manual_seed(R * 1000 + S)
    q = torch.randn(b, kv, R, hd, generator=g).to(dtype)
    cache_k = torch.randn(b, kv, S + 50, hd, generator=g).mul(3).to(dtype)  # scores of several units: a peaked softmax
    cache_v = torch.randn(b, kv, S + 50, hd, generator=g).to(dtype)
    k, v = cache_k[:, :, 10 : 10 + S], cache_v[:, :, 10 : 10 + S]
    got = cpu.flash_attention_lse(q, k, v, hd**-0.5)
    if not (_kernel_has_avx512() if dtype == torch.float32 else _kernel_has_bf16_flash()):
        assert got is None  # torch's kernel runs instead
        return
    out, lse = got
    ref_out, ref_lse = reference.attention_lse(q, k, v, hd**-0.5)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert ((out - ref_out).norm() / ref_out.norm()).item() <= (1e-5 if dtype == torch.float32 else 4e-3)
    assert ((lse - ref_lse).abs() / (1 + ref_lse.abs())).max().item() <= 2e-6


@needs_cpu
def test_flash_attention_lse_declines_what_it_does_not_cover():
    q = torch.randn(1, 1, 4, 24).bfloat16()  # head_dim 24: not a multiple of 16
    assert cpu.flash_attention_lse(q, q, q, 0.2) is None
    q = torch.randn(1, 1, 4, 32)
    assert cpu.flash_attention_lse(q, q.bfloat16(), q, 0.2) is None  # mixed dtypes
    assert cpu.flash_attention_lse(q.half(), q.half(), q.half(), 0.2) is None  # fp16: torch's kernel
    with ops.using("reference"):  # the reference backend has no flash kernel (its scores are (R, S))
        assert ops.flash_attention_lse(q.bfloat16(), q.bfloat16(), q.bfloat16(), 0.2) is None


@needs_cpu
def test_bf16_flash_choice_between_our_kernel_and_torchs(monkeypatch):
    """bf16 attention over past keys runs on whichever kernel is faster on this CPU (torch's uses AMX tiles
    where there are some): "torch" declines to the caller, "ours" runs ours where it applies, "auto" measures
    once per thread count; fp32 is always ours."""
    q = torch.randn(1, 2, 8, 64, generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("JAMBA_LOCAL_BF16_FLASH", "torch")
    assert cpu.flash_attention_lse(q.bfloat16(), q.bfloat16(), q.bfloat16(), 0.125) is None
    assert (cpu.flash_attention_lse(q, q, q, 0.125) is not None) == _kernel_has_avx512()
    monkeypatch.setenv("JAMBA_LOCAL_BF16_FLASH", "ours")
    assert (cpu.flash_attention_lse(q.bfloat16(), q.bfloat16(), q.bfloat16(), 0.125) is not None) == _kernel_has_bf16_flash()
    monkeypatch.setenv("JAMBA_LOCAL_BF16_FLASH", "auto")
    monkeypatch.setattr(cpu, "_bf16_flash_choice", {})
    choice = cpu.bf16_flash_ours()
    assert list(cpu._bf16_flash_choice) == [torch.get_num_threads()]  # measured once per thread count
    assert choice or _kernel_has_bf16_flash()  # torch's is chosen only over a kernel of ours that runs
    got = cpu.flash_attention_lse(q.bfloat16(), q.bfloat16(), q.bfloat16(), 0.125)
    assert (got is not None) == (choice and _kernel_has_bf16_flash())


@needs_cpu
def test_bf16_chunked_prefill_over_past_key_blocks_close_to_reference_path(monkeypatch, tmp_path):
    """A bf16 model prefilled in chunks with the past keys in small blocks: the fast path (our flash kernel
    where the CPU has AVX512-BF16) against the reference ops (torch's kernel), within bf16 rounding."""
    monkeypatch.setenv("JAMBA_LOCAL_BF16_FLASH", "ours")
    from test_model_parity import CONFIGS, load_ours, reference_model

    from jamba_core.cache import HybridCache
    from jamba_core.loading import load_config, load_model
    from jamba_core.model import attention

    monkeypatch.setattr(attention, "PAST_KEY_BLOCK", 23)
    ref = reference_model(CONFIGS["attn-odd-moe-even"])
    load_ours(ref, tmp_path)
    model = load_model(tmp_path, load_config(tmp_path), dtype=torch.bfloat16, progress=False)
    ids = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(4))
    logits, calls = {}, []
    real = cpu.flash_attention_lse
    monkeypatch.setattr(cpu, "flash_attention_lse", lambda *a: calls.append(real(*a)) or calls[-1])
    for name in ("reference", "cpu"):
        with ops.using(name), torch.no_grad():
            cache = HybridCache(model.config, dtype=torch.bfloat16)
            logits[name] = torch.cat([model(ids[:, s : s + 24], cache=cache) for s in range(0, 96, 24)], 1).float()
    assert calls, "the fast path never asked the kernel"
    assert all((c is not None) == _kernel_has_bf16_flash() for c in calls)
    assert rel(logits["cpu"], logits["reference"]) <= BF16_REL


@pytest.mark.parametrize("name", BACKENDS)
def test_fp32_model_with_bf16_kv_cache_close_to_fp32_cache(name, monkeypatch, tmp_path):
    """fp32 weights, K/V stored in bf16 (kv_cache_dtype): chunked prefill with past keys in blocks, then
    decode (on the CPU backend through the fused layer kernel, which writes bf16 rows), against the same model
    with an fp32 cache, within bf16 rounding of K, V and q."""
    from test_model_parity import CONFIGS, load_ours, reference_model

    from jamba_core.cache import HybridCache
    from jamba_core.model import attention

    monkeypatch.setattr(attention, "PAST_KEY_BLOCK", 23)
    ours = load_ours(reference_model(CONFIGS["attn-odd-moe-even"]), tmp_path)
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(6))
    fused = []
    real = cpu.attention_layer_decode
    monkeypatch.setattr(cpu, "attention_layer_decode", lambda *a: fused.append(real(*a)) or fused[-1])
    logits = {}
    with ops.using(name), torch.no_grad():
        for kv_dtype in (torch.float32, torch.bfloat16):
            cache = HybridCache(ours.config, kv_dtype=kv_dtype)
            prefill = [ours(ids[:, s : s + 24], cache=cache) for s in range(0, 72, 24)]
            steps = [ours(ids[:, t : t + 1], cache=cache) for t in range(72, 80)]
            assert all(layer.k.dtype == kv_dtype for layer in cache.layers if hasattr(layer, "store"))
            logits[kv_dtype] = torch.cat(prefill + steps, 1)
    assert rel(logits[torch.bfloat16], logits[torch.float32]) <= BF16_REL
    if name == "cpu":
        assert fused and all(y is not None for y in fused)


def test_the_busy_check_reads_other_processes_cpu_time_not_the_load_average(monkeypatch):
    """Kernels below BUSY_SERIAL_WORK run on one thread while other processes use the cores our threads need.
    The 1-minute load average took a minute to show a new hog and counted our own threads; the check now
    takes the CPU time /proc/stat counts outside this process since its last sample (every BUSY_CHECK_S)."""
    from jamba_core.ops import cpu

    samples = iter([(0.0, 100.0, 10.0),   # (wall s, busy CPU s on all cores, this process's CPU s)
                    (1.0, 101.9, 11.8),   # 1.9 CPU s in 1 s, 1.8 of them ours: others 0.1 core -> not busy
                    (2.0, 103.9, 12.7),   # 2.0 CPU s, 0.9 ours: others 1.1 cores -> busy with 2 threads
                    (3.0, 105.9, 14.6)])  # 2.0 CPU s, 1.9 ours: quiet again
    monkeypatch.setattr(cpu, "_cpu_sample", lambda: next(samples))
    monkeypatch.setattr(cpu, "_cores", lambda: 2)
    monkeypatch.setattr(cpu.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # first sample: no window yet, the load average answers
    monkeypatch.setattr(cpu, "_busy", {"checked": -1e9, "busy": False, "sample": None})
    answers = []
    for _ in range(4):
        cpu._busy["checked"] = -1e9  # as if BUSY_CHECK_S had passed
        answers.append(cpu._machine_busy())
    assert answers == [True, False, True, False]
    assert cpu._threads(cpu.SERIAL_WORK) == 2  # quiet: parallel above SERIAL_WORK
    monkeypatch.setattr(cpu, "_machine_busy", lambda: True)
    assert cpu._threads(cpu.SERIAL_WORK) == 1 and cpu._threads(cpu.BUSY_SERIAL_WORK) == 2


def test_the_busy_check_counts_only_the_cores_this_process_may_use(monkeypatch):
    """Under taskset or a cpuset, load on other cores took nothing from our threads but counted as busy."""
    import io

    from jamba_core.ops import cpu

    stat = (b"cpu  900 0 100 5000 0 0 0 0 0 0\ncpu0 100 0 0 2500 0 0 0 0 0 0\n"
            b"cpu1 800 0 100 2500 0 0 0 0 0 0\nintr 1\n")
    monkeypatch.setattr(cpu, "open", lambda *args: io.BytesIO(stat), raising=False)
    monkeypatch.setattr(cpu.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0})
    assert cpu._cpu_sample()[1] == 1.0  # cpu0's 100 ticks, not the machine's 1000
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu._cpu_sample()[1] == 10.0


def test_aarch64_gemvs_match_a_double_reference_under_qemu(tmp_path):
    """aarch64 (NEON, 4 lanes; int8 weights widened by SXTL, which GCC's generic form did byte by byte): the fp32
    and int8 GEMVs cross-built and run under qemu, where ``aarch64-linux-gnu-g++`` and ``qemu-aarch64-static``
    are installed (Debian: g++-aarch64-linux-gnu, qemu-user-static); no aarch64 machine is at hand otherwise."""
    import shutil
    import subprocess

    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip("no aarch64 cross compiler or qemu here")
    here = os.path.dirname(__file__)
    exe = tmp_path / "harness"
    subprocess.run([cxx, "-O3", "-march=armv8-a", "-fopenmp", "-std=c++17", "-fno-math-errno", str(cpu.SOURCE),
                    os.path.join(here, "aarch64_gemv_harness.cpp"), "-o", str(exe)], check=True, capture_output=True, timeout=600)
    proc = subprocess.run([qemu, str(exe)], env=dict(os.environ, QEMU_LD_PREFIX="/usr/aarch64-linux-gnu"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.count(" ok") == 8, proc.stdout + proc.stderr


@needs_cpu
def test_ops_choice_flash_case_times_both_kernels_it_can_run():
    """benchmarks.ops_choice's flash-attention case on a small shape: every kernel that applies here is timed
    (torch's always; ours for fp32 with AVX-512, for bf16 with AVX512-BF16); no speed is asserted."""
    from benchmarks import ops_choice

    got = ops_choice.flash_attention(keys=96, reps=1, chunk=8)
    assert {"flash[torch float32]", "flash[torch bfloat16]"} <= set(got)
    assert ("flash[ours float32]" in got) == _kernel_has_avx512()
    assert ("flash[ours bfloat16]" in got) == _kernel_has_bf16_flash()
    assert all(r["median_ms"] > 0 and r["gflops"] > 0 for r in got.values())
