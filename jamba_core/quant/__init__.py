"""Weight quantization: which modules, in which format, applied while loading, saved and reloaded.

Schemes (``QuantConfig.scheme``):
- ``"int8"``: weight-only int8, one fp32 scale per output row (`jamba_core.quant.int8`).
- ``"bnb-int8"``, ``"bnb-nf4"``: bitsandbytes' LLM.int8() and NF4 through its own modules
  (`jamba_core.quant.bnb`; needs the ``quant`` extra).

Targets: the feed-forward projections (every MoE expert's and every dense MLP's ``gate_proj``,
``up_proj``, ``down_proj``) by default; attention's ``q/k/v/o_proj`` with ``attention=True``; Mamba's
``in_proj`` and ``out_proj`` with ``mamba=True`` (off by default: AI21 advises keeping the Mamba blocks in
float); ``lm_head`` with ``lm_head=True`` unless it is tied to the embedding (`lm_head_unsupported_reason`). The
MoE router (near-ties in its top-k flip under small perturbations), the embedding, the norms and Mamba's
small ``x_proj`` / ``dt_proj`` (read as raw weights by the fused decode step) always stay in float.

The model code has no quantization branches: quantized modules replace ``Linear`` modules by name
(`quantize_model` for a model in memory; `LoadPlan`, used by `jamba_core.loading.load_model`, on the meta
model before any weight is allocated, so that each weight is quantized as it is read from the file).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import JambaConfig, d_inner, is_attention_layer, is_moe_layer
from . import bnb
from .int8 import Int8Linear, kernel_path, quantize_rows

SCHEMES = ("int8", *bnb.SCHEMES)
QUANT_METHOD = "jamba-local"  # config.json's quantization_config.quant_method for checkpoints we save
FORMAT_VERSION = 1
SHARD_BYTES = 4 << 30

_FEED_FORWARD = re.compile(r"\.feed_forward\.(experts\.\d+\.)?(gate|up|down)_proj$")
_ATTENTION = re.compile(r"\.self_attn\.[qkvo]_proj$")
_MAMBA = re.compile(r"\.mamba\.(in|out)_proj$")
_TOKENIZER_SUFFIXES = (".json", ".jinja", ".model", ".txt")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "jamba_local_checkpoint.json"}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. ``scheme``: one of `SCHEMES`; ``attention`` / ``mamba`` / ``lm_head``:
    also quantize those projections (the feed-forward ones always are).

    `QuantConfig.parse` also reads strings: ``"int8"``, ``"int8+mamba"``, ``"bnb-nf4+attention+mamba"``.
    """

    scheme: str
    attention: bool = False
    mamba: bool = False
    lm_head: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {self.scheme!r}; available: {', '.join(SCHEMES)} "
                             "(optionally with '+attention', '+mamba', '+lm_head', e.g. 'int8+mamba')")

    @classmethod
    def parse(cls, value: "str | QuantConfig | dict | None") -> "QuantConfig | None":
        if value is None or isinstance(value, QuantConfig):
            return value
        if isinstance(value, dict):
            return cls(value["scheme"], *(bool(value.get(k, False)) for k in _OPTIONS))
        scheme, *extras = str(value).strip().lower().split("+")
        unknown = set(extras) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"unknown quantization option(s) {sorted(unknown)} in {value!r}; options: "
                             + ", ".join("+" + o for o in _OPTIONS))
        return cls(scheme, *(o in extras for o in _OPTIONS))

    def __str__(self) -> str:
        return self.scheme + "".join("+" + o for o in _OPTIONS if getattr(self, o))

    def matches(self, name: str) -> bool:
        """Whether the module ``name`` (e.g. ``model.layers.1.feed_forward.experts.3.up_proj``) is a target."""
        return bool(_FEED_FORWARD.search(name) or (self.attention and _ATTENTION.search(name))
                    or (self.mamba and _MAMBA.search(name)) or (self.lm_head and name == "lm_head"))


_OPTIONS = ("attention", "mamba", "lm_head")


def lm_head_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``lm_head`` cannot be quantized in ``model`` (None when it can).

    The model must take its compute dtype from somewhere other than ``lm_head.weight`` (which becomes
    int8): `JambaForCausalLM.compute_dtype`, which the engine reads too. A head tied to the embedding
    stays float (the table is also the input embedding, which is never quantized).
    """
    if not hasattr(type(model), "compute_dtype"):
        return (f"{type(model).__name__} takes its compute dtype from lm_head.weight, which a quantized lm_head "
                "holds in int8 (it needs a `compute_dtype` property, used by its forward and by Engine)")
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return "lm_head is tied to the input embedding"
    return None


def target_names(model: nn.Module, quantization) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``quantization`` replaces, in model order."""
    q = QuantConfig.parse(quantization)
    if q.lm_head:
        reason = lm_head_unsupported_reason(model)
        if reason:
            raise ValueError(f"cannot quantize lm_head: {reason}")
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and q.matches(name)]


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """``{module name: scheme}`` of the quantized modules in ``model``."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            found[name] = "int8"
        elif bnb.is_bnb_module(m):
            found[name] = "bnb-int8" if type(m).__name__ == "Linear8bitLt" else "bnb-nf4"
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _require(scheme: str) -> None:
    if scheme in bnb.SCHEMES:
        reason = bnb.unavailable_reason()
        if reason:
            raise ImportError(f"quantization={scheme!r} needs bitsandbytes (pip install 'jamba-local[quant]'): {reason}")


@torch.no_grad()
def quantize_model(model: nn.Module, quantization) -> nn.Module:
    """Replace the target ``Linear`` modules of a float model in memory (in place; returns the model).
    Each float weight is released as soon as its module is replaced."""
    q = QuantConfig.parse(quantization)
    _require(q.scheme)
    for name in target_names(model, q):
        linear = model.get_submodule(name)
        if q.scheme == "int8":
            module = Int8Linear.from_float(linear)
        else:
            module = bnb.from_float(q.scheme, linear.weight, linear.bias, linear.weight.dtype, linear.weight.device)
        _set_module(model, name, module)
    model.quantization = q
    return model


# -- loading -----------------------------------------------------------------------------------------
class _Pending(nn.Module):
    """Stands in for a bitsandbytes module until its tensors are read (bitsandbytes builds its quantized
    parameters from a real tensor, not on the meta device). Holds the bias, which loads as usual."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x):
        raise RuntimeError("this quantized module was never loaded")


class LoadPlan:
    """Quantization applied by the loader. Built on the meta model, before allocation: it replaces each
    target module with an `Int8Linear` (int8 buffers, allocated by ``to_empty``) or a placeholder for a
    bitsandbytes module. The loader then hands over each tensor it reads that the plan `owns`:

    - from a float checkpoint, ``{module}.weight``, quantized at once (`Int8Linear.set_weight`, or the
      bitsandbytes module is built from it), so only one float tensor is ever held;
    - from a checkpoint saved by `save_quantized` (``saved_modules``: the module names its config lists),
      the stored quantized tensors (``weight`` int8 and ``scale`` for int8; bitsandbytes' own entries
      otherwise), copied as they are.
    """

    def __init__(self, model: nn.Module, quantization, compute_dtype: torch.dtype, device="cpu", saved_modules: list[str] | None = None):
        self.quant = QuantConfig.parse(quantization)
        _require(self.quant.scheme)
        self.model, self.compute_dtype, self.device = model, compute_dtype, torch.device(device)
        self.saved = saved_modules is not None
        names = saved_modules if self.saved else target_names(model, self.quant)
        self._shapes: dict[str, tuple | None] = {}  # tensor name -> expected shape (None: not checked)
        self._owner: dict[str, str] = {}  # tensor name -> module name
        self._parts: dict[str, dict[str, torch.Tensor]] = {}  # bitsandbytes tensors read so far, per module
        for name in names:
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"quantization config lists {name!r}, which is not a linear layer of this model")
            out_f, in_f, has_bias = linear.out_features, linear.in_features, linear.bias is not None
            if self.quant.scheme == "int8":
                with torch.device("meta"):
                    _set_module(model, name, Int8Linear(in_f, out_f, bias=has_bias, dtype=compute_dtype))
                entries = {"weight": (out_f, in_f), "scale": (out_f,)} if self.saved else {"weight": (out_f, in_f)}
            else:
                with torch.device("meta"):
                    _set_module(model, name, _Pending(in_f, out_f, has_bias))
                entries = {k: None for k in bnb.saved_keys(self.quant.scheme)} if self.saved else {"weight": (out_f, in_f)}
            for suffix, shape in entries.items():
                self._shapes[f"{name}.{suffix}"] = shape
                self._owner[f"{name}.{suffix}"] = name
        model.quantization = self.quant

    def owns(self, tensor_name: str) -> bool:
        return tensor_name in self._owner

    def expected(self) -> list[str]:
        """Every tensor name the plan must receive."""
        return list(self._owner)

    def shape(self, tensor_name: str) -> tuple | None:
        """The shape the checkpoint must have for ``tensor_name`` (None where the format decides)."""
        return self._shapes[tensor_name]

    @torch.no_grad()
    def load(self, tensor_name: str, tensor: torch.Tensor) -> None:
        module_name = self._owner[tensor_name]
        suffix = tensor_name[len(module_name) + 1 :]
        module = self.model.get_submodule(module_name)
        if isinstance(module, Int8Linear):
            if not self.saved:
                module.set_weight(tensor)
            elif suffix == "weight":
                module.weight.copy_(tensor)
            else:
                module.scale.copy_(tensor)
            return
        parts = self._parts.setdefault(module_name, {})
        parts[suffix] = tensor
        need = bnb.saved_keys(self.quant.scheme) if self.saved else ("weight",)
        if all(k in parts for k in need):
            del self._parts[module_name]
            if self.saved:
                built = bnb.from_saved(self.quant.scheme, parts, module.in_features, module.out_features, module.bias,
                                       self.compute_dtype, self.device)
            else:
                built = bnb.from_float(self.quant.scheme, parts["weight"], module.bias, self.compute_dtype, self.device)
            _set_module(self.model, module_name, built)


def resolve_for_checkpoint(config: JambaConfig, quantization) -> tuple[QuantConfig | None, list[str] | None]:
    """The quantization to apply when loading a checkpoint with ``config``, and the saved module list when
    the checkpoint is already quantized (by `save_quantized`). Raises ``ValueError`` when the request
    contradicts the checkpoint (a quantized checkpoint cannot be requantized another way)."""
    requested = QuantConfig.parse(quantization)
    saved = getattr(config, "quantization_config", None)
    if not saved:
        return requested, None
    if saved.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"checkpoint is quantized with quant_method={saved.get('quant_method')!r}; jamba-local loads "
                         f"only float checkpoints and those it saved itself (quant_method={QUANT_METHOD!r})")
    stored = QuantConfig.parse(saved)
    if requested is not None and requested != stored:
        raise ValueError(f"checkpoint is already quantized as {stored}; it cannot be loaded as {requested} "
                         "(load the float checkpoint to quantize it another way)")
    return stored, list(saved["modules"])


# -- saving ------------------------------------------------------------------------------------------
def _state_dict_keeping_cpu_packing(model) -> dict:
    """``model.state_dict()`` (detached, contiguous) leaving bitsandbytes' 4-bit modules as they run.

    On a CPU with AVX512-BF16, `bitsandbytes.nn.Linear4bit`'s first forward repacks its weight for the CPU
    kernel (the nested block scales dequantized to fp32), and its ``_save_to_state_dict`` undoes that in
    place, quantizing the scales again: saving changed the live engine's logits (by 8e-3 on the tiny model),
    and each later save differed from the one before. The packed weight and a copy of its quant state are
    put back after the state dict is read, so saves repeat exactly; the saved scales are the ones quantized
    when the module was made (`bnb.saved_stats`), not bitsandbytes' requantization of the fp32 ones, so a
    checkpoint saved after generating reloads as the same model."""
    import copy

    packed = [(m, m.weight.data, copy.deepcopy(m.weight.quant_state)) for m in model.modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        for name, module in model.named_modules():  # the scales as quantized, not requantized (bnb.saved_stats)
            for k, v in (bnb.saved_stats(module) or {}).items():
                key = f"{name}.weight.{k}" if name else f"weight.{k}"
                if key in state:
                    state[key] = v.contiguous()
        return state
    finally:
        for module, data, quant_state in packed:
            module.weight.data, module.weight.quant_state = data, quant_state


def save_quantized(engine_or_model, path, config: JambaConfig | None = None, source=None, tokenizer=None,
                   overwrite: bool = False) -> Path:
    """Write a quantized model as a checkpoint folder that reloads without requantizing.

    ``engine_or_model``: an `Engine` (its config, and the tokenizer files of its checkpoint folder, are
    used) or a quantized `JambaForCausalLM` (then pass ``config``, and ``source`` (a folder whose tokenizer
    files are copied) or ``tokenizer``). Writes ``model.safetensors`` (sharded with an index past
    `SHARD_BYTES`), ``config.json`` with ``quantization_config`` (scheme, options, the quantized module
    names), and the tokenizer files. Returns the folder. Raises ``FileExistsError`` where ``path`` already
    holds weights (``model*.safetensors``: the source checkpoint itself, or another model), unless
    ``overwrite``.
    """
    from safetensors.torch import save_file

    model = getattr(engine_or_model, "model", engine_or_model)
    config = config if config is not None else getattr(engine_or_model, "config", None) or getattr(model, "config", None)
    source = source if source is not None else getattr(engine_or_model, "path", None)
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model has no quantized modules: load it with quantization=... or call quantize_model first")
    schemes = set(modules.values())
    if len(schemes) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(schemes)}; save_quantized writes one")
    quant = getattr(model, "quantization", None) or QuantConfig(schemes.pop())
    path = Path(path)
    held = sorted(p.name for p in path.glob("model*.safetensors")) if path.is_dir() else []
    if held and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({', '.join(held[:3])}); save_quantized would replace "
                              "its weights: choose a new folder, or pass overwrite=True")
    path.mkdir(parents=True, exist_ok=True)

    state = _state_dict_keeping_cpu_packing(model)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    raw = config.to_dict()
    raw["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **asdict(quant),
                                  "modules": list(modules)}
    raw.setdefault("architectures", ["JambaForCausalLM"])
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")

    if source is not None and Path(source).resolve() != path.resolve():
        for f in Path(source).iterdir():
            if f.is_file() and f.suffix in _TOKENIZER_SUFFIXES and f.name not in _NOT_COPIED:
                shutil.copy2(f, path / f.name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# -- memory ------------------------------------------------------------------------------------------
def scheme_bytes(scheme: str, out_features: int, in_features: int) -> int:
    """Bytes one quantized ``(out, in)`` weight occupies, scales included (bias aside)."""
    n = out_features * in_features
    if scheme == "int8":
        return n + 4 * out_features  # int8 matrix + fp32 row scales
    if scheme == "bnb-int8":
        return n + 4 * out_features + 1  # int8 matrix + fp32 SCB + the format byte
    blocks = -(-n // bnb.NF4_BLOCKSIZE)
    # 4-bit codes, one uint8 absmax code per block (double quantization), fp32 absmax per 256 blocks,
    # the two code books (16 + 256 fp32) and bitsandbytes' packed state (~200 bytes)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256) + 200


def weight_bytes(config: JambaConfig, quantization, dtype_size: int) -> int:
    """Bytes of all the weights of ``config`` with ``quantization`` applied and the rest at
    ``dtype_size`` bytes per parameter (as `jamba_core.memory.estimate_memory` counts float weights).
    Raises ``ValueError`` for ``lm_head`` quantization on a config whose head is tied to the embedding."""
    from ..config import parameter_count

    q = QuantConfig.parse(quantization)
    total = parameter_count(config).total * dtype_size
    if q is None:
        return total
    H, I, di = config.hidden_size, config.intermediate_size, d_inner(config)
    hd = H // config.num_attention_heads
    shapes: list[tuple[int, int]] = []
    for i in range(config.num_hidden_layers):
        experts = config.num_experts if is_moe_layer(config, i) else 1
        shapes += [(I, H), (I, H), (H, I)] * experts
        if is_attention_layer(config, i):
            if q.attention:
                kv = config.num_key_value_heads * hd
                shapes += [(config.num_attention_heads * hd, H), (kv, H), (kv, H), (H, config.num_attention_heads * hd)]
        elif q.mamba:
            shapes += [(2 * di, H), (H, di)]
    if q.lm_head:
        if config.tie_word_embeddings:
            raise ValueError("cannot quantize lm_head: it is tied to the input embedding (tie_word_embeddings)")
        shapes.append((config.vocab_size, H))
    for out_f, in_f in shapes:
        total += scheme_bytes(q.scheme, out_f, in_f) - out_f * in_f * dtype_size
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each storage counted once: tied weights too)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():  # bitsandbytes keeps part of its state outside parameters
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [t for t in qs.as_dict(packed=True).values() if isinstance(t, torch.Tensor)]
        state = getattr(m, "state", None)
        if state is not None and getattr(state, "SCB", None) is not None:
            tensors.append(state.SCB)
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


__all__ = ["SCHEMES", "QuantConfig", "Int8Linear", "LoadPlan", "kernel_path", "lm_head_unsupported_reason", "quantize_model", "quantize_rows",
           "quantized_modules", "resident_bytes", "resolve_for_checkpoint", "save_quantized", "scheme_bytes",
           "target_names", "weight_bytes"]
