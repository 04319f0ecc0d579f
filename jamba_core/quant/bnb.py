"""bitsandbytes' formats through its own modules: ``bnb-int8`` (``Linear8bitLt``, LLM.int8(), Dettmers et
al. 2022: int8 rows with absmax scales, activations quantized per row, outlier columns above the threshold
kept in 16-bit) and ``bnb-nf4`` (``Linear4bit``, QLoRA, Dettmers et al. 2023: 4-bit NormalFloat in blocks
of 64, block scales themselves quantized).

Both run on CPU with bitsandbytes >= 0.50 (its CPU backend; checked with 0.50.2). Quantization happens
when the float weight moves to a device (``Int8Params.to`` / ``Params4bit.to``), which is how the loader
quantizes one tensor at a time. Saved checkpoints hold bitsandbytes' own state-dict entries (``weight`` and ``SCB`` for int8;
``weight`` and ``weight.absmax``, ``weight.quant_map``, ... for nf4) and reload without requantizing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

SCHEMES = ("bnb-int8", "bnb-nf4")
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, as the paper and transformers' BitsAndBytesConfig use
NF4_BLOCKSIZE = 64
CPU_PACK_ROWS = 32  # bitsandbytes' block_n of its CPU packing (_convert_weight_packed_for_cpu)


def unavailable_reason() -> str | None:
    """None when bitsandbytes imports and runs on this machine, else why not (for error messages)."""
    try:
        _bnb()
    except Exception as err:  # ImportError, or a native library that fails to load
        return f"bitsandbytes is not usable here ({type(err).__name__}: {err}); install it with `pip install 'jamba-local[quant]'`"
    return None


def _bnb():
    # bitsandbytes logs at import that its optional `kernels` package (a hub download) is absent; that
    # package only speeds up one nf4 CPU path, so the message is noise here
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def saved_keys(scheme: str) -> tuple[str, ...]:
    """The state-dict entries (after the module prefix) of one saved module, bias aside."""
    if scheme == "bnb-int8":
        return ("weight", "SCB", "weight_format")
    return ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4")


def _empty_module(scheme: str, in_features: int, out_features: int, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    with torch.device("meta"):  # no float weight is allocated: it is replaced below
        if scheme == "bnb-int8":
            return bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD)
        module = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
    if getattr(module, "support_avx512bf16_for_cpu", False) and (out_features % CPU_PACK_ROWS or in_features % NF4_BLOCKSIZE):
        # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first forward, which needs
        # out_features % 32 == 0 and in_features % 64 == 0 (else an AssertionError or a reshape error from its
        # internals); other widths take its unpacked path, which computes them
        module.support_avx512bf16_for_cpu = False
    return module


def from_float(scheme: str, weight: torch.Tensor, bias: nn.Parameter | None, compute_dtype: torch.dtype, device="cpu") -> nn.Module:
    """A bitsandbytes module holding ``weight (out, in)`` quantized (any float dtype; it is read once)."""
    bnb = _bnb()
    out_features, in_features = weight.shape
    module = _empty_module(scheme, in_features, out_features, compute_dtype)
    w = weight.detach().to("cpu", copy=True)  # the Params take ownership of the tensor and quantize it on .to()
    if scheme == "bnb-int8":
        module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        module.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE, module=module).to(device)
        _keep_saved_stats(module)
    module.bias = bias
    return module


def _keep_saved_stats(module: nn.Module) -> None:
    """Keep a 4-bit module's quant state as saved (``as_dict(packed=True)``: the block scales quantized
    against their nested scales), before any forward: on a CPU with AVX512-BF16 the first forward converts
    the state for bitsandbytes' CPU kernel (scales dequantized), and its save quantizes them again one bf16
    step away, so a checkpoint saved after generating reloaded as another model (logits 0.03 apart on the
    tiny model). `saved_stats` gives these back to `jamba_core.quant.save_quantized`. Cost: one byte per
    block of `NF4_BLOCKSIZE` weights (about 16 KB per million weights, 3% of the 4-bit weights' bytes)."""
    module.jl_saved_stats = {k: v.detach().clone() for k, v in module.weight.quant_state.as_dict(packed=True).items()}


def saved_stats(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """A 4-bit module's quant-state entries as quantized (keys after ``weight.``), or None."""
    return getattr(module, "jl_saved_stats", None)


def from_saved(scheme: str, tensors: dict[str, torch.Tensor], in_features: int, out_features: int, bias: nn.Parameter | None,
               compute_dtype: torch.dtype, device="cpu") -> nn.Module:
    """A bitsandbytes module from its saved entries (keys as `saved_keys`), without requantizing."""
    bnb = _bnb()
    module = _empty_module(scheme, in_features, out_features, compute_dtype)
    data = tensors["weight"].to(device)
    if scheme == "bnb-int8":
        module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=tensors["SCB"].to(device))
    else:
        stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
        module.weight = bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=device, module=module)
        _keep_saved_stats(module)
    module.bias = bias
    return module


def is_bnb_module(module: nn.Module) -> bool:
    try:
        bnb = _bnb()
    except Exception:
        return False
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
