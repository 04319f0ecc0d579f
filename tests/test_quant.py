"""Quantization: the int8 module against fp32, which modules are quantized, quantize-on-load, saving and
reloading, resident bytes and the memory formula, and bitsandbytes' formats where it runs."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jamba_core import Engine, ops
from jamba_core.cli import main as cli_main
from jamba_core.config import load_config
from jamba_core.loading import SafetensorsFile, load_model
from jamba_core.memory import estimate_memory
from jamba_core.model import JambaForCausalLM
from jamba_core.quant import (Int8Linear, QuantConfig, bnb, int8, kernel_path, lm_head_unsupported_reason, quantize_model,
                              quantized_modules, resident_bytes, save_quantized)
from jamba_core.testing import make_config, random_weights

# One int8 matrix has a relative weight error of about 0.7% (Gaussian rows: absmax ~3 sigma, step
# absmax/127, error step/sqrt(12)); the bf16 activations the CPU kernel takes add ~0.2%.
INT8_LINEAR_REL = 0.015
KERNEL_VS_DEQUANT_REL = 0.01  # same int8 weights: only the bf16 activation rounding differs
TINY_LOGITS_REL = 0.01  # tiny checkpoint, feed-forward in int8 (measured 0.3%)
NF4_LOGITS_REL = 0.10  # 4-bit NormalFloat: ~9% weight error per matrix
BNB = bnb.unavailable_reason()
needs_bnb = pytest.mark.skipif(BNB is not None, reason=str(BNB))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 4000, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def fp32_logits(tiny_engine, ids):
    with torch.no_grad():
        return tiny_engine.model(ids)


@pytest.fixture(scope="module")
def int8_engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint, quantization="int8", progress=False)


# -- the module ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])  # decode-sized (int8 kernel) and prefill-sized (GEMM) inputs
@pytest.mark.parametrize("in_features", [208, 200])  # 200: not a multiple of 16, the GEMM path runs
def test_int8_linear_matches_fp32_within_bound(dtype, rows, in_features):
    g = torch.Generator().manual_seed(rows + in_features)
    linear = torch.nn.Linear(in_features, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, in_features, generator=g) * 0.02)
        linear.bias.copy_(torch.randn(96, generator=g) * 0.1)
    q = Int8Linear.from_float(linear.to(dtype))
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, in_features) and q.scale.shape == (96,)
    assert q.weight.abs().max() <= 127
    x = torch.randn(3, rows, in_features, generator=g).to(dtype)
    y = q(x)
    assert y.shape == (3, rows, 96) and y.dtype == dtype
    assert rel(y, F.linear(x.float(), linear.weight.float(), linear.bias.float())) <= INT8_LINEAR_REL
    assert rel(y, F.linear(x.float(), q.dequantize(), linear.bias.float())) <= KERNEL_VS_DEQUANT_REL


def test_row_scales_are_absmax_over_127_and_reconstruct_within_half_a_step():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = int8.quantize_rows(w)
    nonzero = torch.arange(64) != 5
    assert torch.allclose(scale[nonzero], w[nonzero].abs().amax(1) / 127)
    assert (q[5] == 0).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_decode_runs_the_int8_kernel_prefill_a_gemm_and_both_agree(monkeypatch):
    q = Int8Linear.from_float(torch.nn.Linear(64, 32, bias=False))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with ops.using("reference"):  # no C++ kernel: torch's int8 kernel
        assert kernel_path("cpu", 64, rows=1) == "int8pack"  # torch >= 2.4 ships aten._weight_int8pack_mm for CPU
        assert kernel_path("cpu", 65, rows=1) == "dequant-gemm"  # it has no tail for widths not a multiple of 16
        int8pack = q(x)
    assert kernel_path("cpu", 64, rows=int8.GEMM_ROWS) == "dequant-gemm"
    if ops.cpu.available():
        with ops.using("cpu"):
            assert kernel_path("cpu", 65, rows=1) == "gemv"  # any width
            gemv = q(x)
        assert rel(gemv, F.linear(x, q.dequantize())) <= 1e-5  # fp32 activations, fp32 sums
    monkeypatch.setattr(int8, "kernel_path", lambda device="cpu", in_features=0, rows=1: "dequant-gemm")
    assert rel(int8pack, q(x)) <= KERNEL_VS_DEQUANT_REL
    monkeypatch.setattr(int8, "TILE_ELEMENTS", 64 * 5)  # several tiles, the last one partial
    assert torch.allclose(q(x), F.linear(x, q.dequantize()), rtol=1e-5, atol=1e-6)


# -- which modules ---------------------------------------------------------------------------------
def test_default_targets_are_the_feed_forward_projections_and_mamba_stays_float(int8_engine):
    model = int8_engine.model
    config = int8_engine.config
    quantized = set(quantized_modules(model))
    expected = set()
    for i, layer in enumerate(model.model.layers):
        ff = f"model.layers.{i}.feed_forward"
        owners = [f"{ff}.experts.{e}" for e in range(config.num_experts)] if hasattr(layer.feed_forward, "experts") else [ff]
        expected |= {f"{o}.{p}" for o in owners for p in ("gate_proj", "up_proj", "down_proj")}
    assert quantized == expected
    for name, module in model.named_modules():
        if ".mamba." in name or ".self_attn." in name or name.endswith("router") or name == "lm_head":
            assert not isinstance(module, Int8Linear), name
    assert model.model.layers[0].mamba.in_proj.weight.dtype == torch.float32


def test_options_add_mamba_in_out_and_attention_projections():
    model = JambaForCausalLM(make_config("tiny"))
    quantize_model(model, "int8+attention+mamba")
    names = set(quantized_modules(model))
    assert {"model.layers.0.mamba.in_proj", "model.layers.0.mamba.out_proj", "model.layers.2.self_attn.q_proj",
            "model.layers.2.self_attn.o_proj"} <= names
    # x_proj and dt_proj are read as raw weights by the fused Mamba decode step: they stay float
    assert not any(n.endswith(("x_proj", "dt_proj", "router")) for n in names)
    assert str(QuantConfig.parse("int8+mamba+attention")) == "int8+attention+mamba"
    with pytest.raises(ValueError, match="unknown quantization"):
        QuantConfig.parse("int4")
    with pytest.raises(ValueError, match="options"):
        QuantConfig.parse("int8+embeddings")


def test_quantized_mamba_with_projection_bias_stays_close():
    torch.manual_seed(0)
    config = make_config("tiny", mamba_proj_bias=True)
    model = JambaForCausalLM(config)
    model.load_state_dict(random_weights(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias") and ".mamba." in name:
                p.normal_(0, 0.1)
    ids = torch.randint(4, 4000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, "int8+mamba")
        assert model.model.layers[0].mamba.in_proj.bias is not None
        assert rel(model(ids), ref) <= 2 * TINY_LOGITS_REL


# -- the LM head -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint, quantization="int8+lm_head", progress=False)


def test_compute_dtype_comes_from_the_float_weights_not_the_head(tiny_checkpoint, tiny_engine, int8_engine, head_engine, ids):
    assert tiny_engine.model.compute_dtype == int8_engine.model.compute_dtype == torch.float32
    assert isinstance(head_engine.model.lm_head, Int8Linear) and head_engine.model.compute_dtype == torch.float32
    assert head_engine.dtype == torch.float32 and head_engine.new_cache(1).layers[2].k.dtype == torch.float32
    bf16 = Engine.from_pretrained(tiny_checkpoint, dtype="bfloat16", quantization="int8+lm_head", progress=False)
    assert bf16.model.compute_dtype == bf16.dtype == torch.bfloat16 and bf16.model.lm_head.weight.dtype == torch.int8
    with torch.no_grad():
        assert bf16.model(ids).dtype == torch.bfloat16
    assert Engine.from_pretrained(tiny_checkpoint, dtype="bfloat16", progress=False).model.compute_dtype == torch.bfloat16


def test_int8_lm_head_logits_within_one_matrix_error_of_the_float_head(int8_engine, head_engine, fp32_logits, ids):
    """The head adds one int8 matrix: against the same model with a float head the logits differ by about
    one matrix's weight error (INT8_LINEAR_REL; measured 0.6% on tiny), against fp32 by at most the
    feed-forward's error plus that (measured 0.64%)."""
    assert quantized_modules(head_engine.model)["lm_head"] == "int8"
    with torch.no_grad():
        logits = head_engine.model(ids)  # 80 rows: the tiled GEMM
        assert rel(logits, int8_engine.model(ids)) <= INT8_LINEAR_REL
        assert rel(logits, fp32_logits) <= 2 * TINY_LOGITS_REL


def test_greedy_generation_runs_with_the_head_in_int8(int8_engine, head_engine):
    prompt = torch.tensor([int8_engine.encode("Call me Ishmael. Some years ago")])
    # one position's logits: the decode-sized int8 kernel with bf16 activations
    last = head_engine.prefill(prompt, head_engine.new_cache(1))
    reference = int8_engine.prefill(prompt, int8_engine.new_cache(1))
    assert rel(last, reference) <= INT8_LINEAR_REL and int(last.argmax()) == int(reference.argmax())
    out = head_engine.generate("Call me Ishmael.", max_new_tokens=8)
    assert out.usage.completion_tokens == 8
    # the same greedy tokens as with a float head (measured: 16 of 16 on tiny)
    assert out.token_ids == int8_engine.generate("Call me Ishmael.", max_new_tokens=8).token_ids


def test_int8_lm_head_drops_resident_bytes_by_the_heads_share_and_the_estimate_counts_it(int8_engine, head_engine, capsys):
    c = head_engine.config
    V, H = c.vocab_size, c.hidden_size
    assert resident_bytes(int8_engine.model) - resident_bytes(head_engine.model) == V * H * (4 - 1) - 4 * V
    assert resident_bytes(head_engine.model) == estimate_memory(c, 0, dtype="float32", quantization="int8+lm_head").weights
    weights = {}
    for q in ("int8", "int8+lm_head"):
        cli_main(["info", "--model", "ai21labs/AI21-Jamba-1.5-Mini", "--quantization", q, "--json"])
        weights[q] = json.loads(capsys.readouterr().out)["estimate"]["weights"]
    assert weights["int8"] - weights["int8+lm_head"] == 65536 * 4096 * (2 - 1) - 4 * 65536  # bf16 head -> int8 + scales


def test_save_and_reload_with_the_head_in_int8_is_identical(head_engine, ids, tmp_path, monkeypatch):
    folder = save_quantized(head_engine, tmp_path / "int8-head")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"] and "lm_head" in qc["modules"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.int8 and f.get_tensor("lm_head.scale").shape == (head_engine.config.vocab_size,)
    monkeypatch.setattr(int8, "quantize_rows", lambda weight: pytest.fail("a saved checkpoint must not be quantized again"))
    reloaded = Engine.from_pretrained(folder, progress=False)
    assert isinstance(reloaded.model.lm_head, Int8Linear)
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids), head_engine.model(ids))


def test_a_head_tied_to_the_embedding_stays_float():
    config = make_config("tiny", tie_word_embeddings=True)
    model = JambaForCausalLM(config)
    assert "tied" in lm_head_unsupported_reason(model)
    with pytest.raises(ValueError, match="cannot quantize lm_head: lm_head is tied"):  # a bad option: one line in the CLI
        quantize_model(model, "int8+lm_head")
    with pytest.raises(ValueError, match="tied"):
        estimate_memory(config, 0, quantization="int8+lm_head")


def test_the_cli_refuses_a_tied_head_in_int8_in_one_line(tmp_path, capsys):
    """`generate --quantization int8+lm_head` on a tied checkpoint ended in a NotImplementedError traceback."""
    from jamba_core.testing import make_checkpoint

    tied = make_checkpoint(tmp_path / "tied", preset="tiny", tie_word_embeddings=True)
    assert cli_main(["generate", "--model", str(tied), "--quantization", "int8+lm_head", "--max-new-tokens", "2", "hi"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: cannot quantize lm_head: lm_head is tied to the input embedding")


# -- quantize on load, save, reload ------------------------------------------------------------------
def test_quantized_tiny_model_logits_close_to_fp32(int8_engine, fp32_logits, ids):
    with torch.no_grad():
        assert rel(int8_engine.model(ids), fp32_logits) <= TINY_LOGITS_REL
    assert int8_engine.generate("Call me Ishmael.", max_new_tokens=6).usage.completion_tokens == 6


def test_quantize_on_load_equals_quantizing_the_loaded_fp32_model(tiny_checkpoint, int8_engine):
    fp32 = load_model(tiny_checkpoint, load_config(tiny_checkpoint), progress=False)
    quantize_model(fp32, "int8")
    loaded = dict(int8_engine.model.named_buffers())
    for name, buf in fp32.named_buffers():
        assert torch.equal(buf, loaded[name]), name


def test_fused_expert_layout_quantizes_like_per_expert_names(tiny_checkpoint, int8_engine, tmp_path):
    """transformers 5 saves experts fused ((E, 2I, H) gate_up, (E, H, I) down): each expert's part is
    read from its byte range and quantized."""
    folder = tmp_path / "fused"
    shutil.copytree(tiny_checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    config = load_config(folder)
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}.feed_forward.experts"
        if f"{pre}.0.gate_proj.weight" not in tensors:
            continue
        E = config.num_experts
        gate_up = [torch.cat([tensors.pop(f"{pre}.{e}.gate_proj.weight"), tensors.pop(f"{pre}.{e}.up_proj.weight")]) for e in range(E)]
        tensors[f"{pre}.gate_up_proj"] = torch.stack(gate_up).to(torch.bfloat16)  # and a dtype to convert
        tensors[f"{pre}.down_proj"] = torch.stack([tensors.pop(f"{pre}.{e}.down_proj.weight") for e in range(E)])
    save_file(tensors, folder / "model.safetensors")
    fused = load_model(folder, config, quantization="int8", progress=False)
    reference = dict(int8_engine.model.named_buffers())
    for name, buf in fused.named_buffers():
        if ".experts." in name and name.endswith("down_proj.weight"):
            assert torch.equal(buf, reference[name]), name
        elif ".experts." in name and name.endswith(".weight"):  # from bf16: within one int8 step
            assert (buf.int() - reference[name].int()).abs().max() <= 1, name


def test_save_and_reload_round_trip_is_identical_without_requantizing(int8_engine, tiny_checkpoint, ids, tmp_path, monkeypatch):
    folder = save_quantized(int8_engine, tmp_path / "int8")
    raw = json.loads((folder / "config.json").read_text())
    qc = raw["quantization_config"]
    assert qc["scheme"] == "int8" and qc["quant_method"] == "jamba-local" and not qc["mamba"]
    assert set(qc["modules"]) == set(quantized_modules(int8_engine.model))
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    name = qc["modules"][0]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{name}.weight").dtype == torch.int8
        assert f.get_tensor(f"{name}.scale").dtype == torch.float32

    def no_requantizing(weight):
        raise AssertionError("a saved quantized checkpoint must load without quantizing again")

    monkeypatch.setattr(int8, "quantize_rows", no_requantizing)
    reloaded = Engine.from_pretrained(folder, progress=False)
    same = Engine.from_pretrained(folder, quantization="int8", progress=False)
    with torch.no_grad():
        expected = int8_engine.model(ids)
        assert torch.equal(reloaded.model(ids), expected)
        assert torch.equal(same.model(ids), expected)
    assert reloaded.generate("Call me Ishmael.", max_new_tokens=8).token_ids == int8_engine.generate("Call me Ishmael.", max_new_tokens=8).token_ids
    with pytest.raises(ValueError, match="already quantized as int8"):
        Engine.from_pretrained(folder, quantization="int8+mamba", progress=False)


def test_save_needs_a_quantized_model(tiny_engine, tmp_path):
    with pytest.raises(ValueError, match="no quantized modules"):
        save_quantized(tiny_engine, tmp_path / "x")


def test_memory_planning_counts_a_saved_quantized_checkpoint_in_its_format(int8_engine, tmp_path, capsys):
    """`estimate_memory` and `info` counted a checkpoint saved int8 as float (24.5 MB for 12.3 MB) and
    took a contradicting quantization that loading refuses."""
    from jamba_core.cli import main

    folder = save_quantized(int8_engine, tmp_path / "int8")
    reloaded = Engine.from_pretrained(folder, progress=False)
    resident = sum(t.numel() * t.element_size() for t in [*reloaded.model.parameters(), *reloaded.model.buffers()])
    assert estimate_memory(folder, 1024, dtype="float32").weights == estimate_memory(
        folder, 1024, dtype="float32", quantization="int8").weights
    assert abs(estimate_memory(folder, 1024, dtype="float32").weights - resident) <= 0.02 * resident
    with pytest.raises(ValueError, match="already quantized as int8"):
        estimate_memory(folder, 1024, quantization="bnb-nf4")
    assert main(["info", "--model", str(folder), "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["quantization"] == "int8"


def test_save_refuses_to_replace_a_checkpoint_s_weights(int8_engine, tmp_path):
    """Saving into the source folder (or any folder holding a model) deleted its float weights unasked."""
    folder = save_quantized(int8_engine, tmp_path / "int8")
    first = (folder / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a checkpoint.*overwrite=True"):
        save_quantized(int8_engine, folder)
    assert (folder / "model.safetensors").read_bytes() == first
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_quantized(int8_engine, int8_engine.path)
    assert save_quantized(int8_engine, folder, overwrite=True) == folder


# -- memory --------------------------------------------------------------------------------------------
def test_int8_resident_bytes_at_most_0_4x_fp32_on_an_expert_dominated_config():
    config = make_config("tiny", vocab_size=512, intermediate_size=512, num_experts=8)
    model = JambaForCausalLM(config)
    fp32 = resident_bytes(model)
    assert fp32 == estimate_memory(config, 0, dtype="float32").weights
    quantize_model(model, "int8")
    assert resident_bytes(model) <= 0.4 * fp32
    assert resident_bytes(model) == estimate_memory(config, 0, dtype="float32", quantization="int8").weights


def test_loaded_int8_model_bytes_match_the_formula(int8_engine):
    est = estimate_memory(int8_engine.config, 0, dtype="float32", quantization="int8")
    assert resident_bytes(int8_engine.model) == est.weights


def test_info_says_whether_a_quantized_model_fits(capsys):
    cli_main(["info", "--model", "ai21labs/AI21-Jamba-1.5-Mini", "--quantization", "int8", "--context", "140000",
              "--fits", "80", "--json"])
    info = json.loads(capsys.readouterr().out)
    # AI21: Jamba 1.5 Mini with its experts in int8 serves 140K tokens on one 80 GB GPU
    assert info["fits"]["fits"] and 50 * 2**30 < info["estimate"]["weights"] < 53 * 2**30
    cli_main(["info", "--model", "ai21labs/AI21-Jamba-1.5-Mini", "--fits", "80"])
    assert "fits in 80 GiB: no" in capsys.readouterr().out


# -- the reader ----------------------------------------------------------------------------------------
def test_safetensors_reader_reads_parts_and_converts(tmp_path):
    t = torch.randn(3, 4, 5).to(torch.bfloat16)
    save_file({"t": t, "i": torch.arange(7, dtype=torch.int8)}, tmp_path / "a.safetensors")
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        assert torch.equal(f.read("t"), t)
        assert torch.equal(f.read("t", (1, slice(1, 3))), t[1, 1:3])
        out = torch.empty(4, 5)
        f.read("t", (2,), out=out)
        assert torch.equal(out, t[2].float())
        assert torch.equal(f.read("i"), torch.arange(7, dtype=torch.int8))


# -- bitsandbytes ----------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("scheme, bound", [("bnb-int8", 2 * TINY_LOGITS_REL), ("bnb-nf4", NF4_LOGITS_REL)])
def test_bitsandbytes_formats_load_run_and_reload(scheme, bound, tiny_checkpoint, fp32_logits, ids, tmp_path):
    engine = Engine.from_pretrained(tiny_checkpoint, quantization=scheme, progress=False)
    assert set(quantized_modules(engine.model).values()) == {scheme}
    with torch.no_grad():
        assert rel(engine.model(ids), fp32_logits) <= bound
    with torch.no_grad():
        live = engine.model(ids)
    folder = save_quantized(engine, tmp_path / scheme)
    reloaded = Engine.from_pretrained(folder, progress=False)
    again = Engine.from_pretrained(save_quantized(engine, tmp_path / f"{scheme}-again"), progress=False)
    with torch.no_grad():
        # saving leaves the live model as it runs (bitsandbytes' 4-bit save requantized the block scales of
        # the CPU packing in place), and saves repeat exactly
        assert torch.equal(engine.model(ids), live)
        assert torch.equal(reloaded.model(ids), again.model(ids))
        # after a forward, the reload is the model that ran: the nf4 block scales saved are those quantized
        # at load, not bitsandbytes' requantization of its CPU packing's fp32 ones (logits 0.03 apart)
        assert torch.equal(reloaded.model(ids), live)
    assert resident_bytes(engine.model) < resident_bytes(Engine.from_pretrained(tiny_checkpoint, progress=False).model)


@needs_bnb
def test_bnb_nf4_head_prefills_in_chunks(tiny_checkpoint):
    """A prompt longer than prefill_chunk_tokens killed the process with SIGFPE under bnb-nf4+lm_head: the
    chunks before the last ran the LM head on zero rows, which bitsandbytes' 4-bit CPU kernel divides by.
    Run in a child process, so that a crash fails this test instead of the session."""
    code = textwrap.dedent(f"""
        from jamba_core import Engine
        prompt = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money"
        for chunk in (4096, 8):
            engine = Engine.from_pretrained({str(tiny_checkpoint)!r}, quantization="bnb-nf4+lm_head",
                                            prefill_chunk_tokens=chunk, progress=False)
            print(engine.generate(prompt, max_new_tokens=5).token_ids)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    whole, chunked = done.stdout.split("\n")[:2]
    assert whole == chunked and len(json.loads(whole)) == 5


@needs_bnb
def test_bnb_nf4_runs_widths_its_cpu_packing_cannot_take(tmp_path):
    """Widths not multiples of 32 (out) and 64 (in) loaded, then failed at the first forward inside
    bitsandbytes' AVX512-BF16 repacking ("N must be divisible by block_n"); they take its unpacked path."""
    from jamba_core.testing import make_checkpoint

    odd = make_checkpoint(tmp_path / "odd", preset="tiny", hidden_size=40, intermediate_size=72, num_attention_heads=5,
                          num_key_value_heads=1)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        want = Engine.from_pretrained(odd, progress=False).model(ids)
        for scheme in ("bnb-nf4", "bnb-nf4+mamba"):
            got = Engine.from_pretrained(odd, quantization=scheme, progress=False).model(ids)
            assert torch.isfinite(got).all() and rel(got, want) <= NF4_LOGITS_REL
