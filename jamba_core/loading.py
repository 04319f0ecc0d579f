"""Checkpoint folder or Hub id -> model, streaming safetensors tensor by tensor.

Only safetensors are read (never pickle, never remote code). The model is built on the meta device,
given real storage once (``to_empty``), then each parameter is read from the file straight into its
storage (`SafetensorsFile`), so peak memory is the loaded model plus at most one tensor. Expert weights
load from the Hub's per-expert names (``feed_forward.experts.{e}.gate_proj.weight``) and from the fused
layout that `transformers` 5 uses in memory (``feed_forward.experts.gate_up_proj`` ``(E, 2I, H)``,
``feed_forward.experts.down_proj`` ``(E, H, I)``).

With ``quantization`` (or a checkpoint saved quantized), the target modules are swapped for quantized ones
on the meta model, before allocation, and each of their weights is quantized as it is read
(`jamba_core.quant.LoadPlan`): the full-precision model never exists in memory.

On Linux the weights are placed in one anonymous mapping advised for transparent huge pages
(`place_in_huge_pages`): a decode step streams every weight once, and with 4 KiB pages the reads miss the
TLB every 4 KiB; measured on this project's 2-vCPU AMD EPYC, bench-small's GEMVs read 10-15% faster from
2 MiB pages. ``JAMBA_LOCAL_HUGE_PAGES=0`` keeps torch's allocation.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
import re
import weakref
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import JambaConfig, load_config
from .model import JambaForCausalLM
from .quant import LoadPlan, resolve_for_checkpoint

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FP32_PARAMS = ("A_log", ".D")  # SSM parameters kept in fp32 whatever the weight dtype
_FUSED = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_CONVERT_CHUNK_BYTES = 16 << 20  # staging buffer when the file's dtype differs from the destination's
_MAX_HEADER_BYTES = 100 << 20


def could_be_hub_id(text: str) -> bool:
    """Whether a path that does not exist locally may name a Hub repository ('org/name')."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hub id fetched (or found in the cache, offline) with
    ``huggingface_hub.snapshot_download``, safetensors and JSON/tokenizer files only."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    text = str(path_or_hub_id)
    if not could_be_hub_id(text):
        raise FileNotFoundError(f"checkpoint folder {text} does not exist (and it is not a Hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]))
    except Exception as err:  # offline, unknown repo, no network: say what to do
        why = " ".join(str(err).split())  # huggingface_hub's messages run over several lines: the CLI prints one
        raise FileNotFoundError(  # a mistyped relative folder looks like a Hub id: say both
            f"{text!r} is no local folder (nothing at {path.resolve()}) and not a Hub checkpoint this machine could get "
            f"({type(err).__name__}: {why}). Check the path, or download it first."
        ) from err


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from ``model.safetensors.index.json`` when present).

    Raises ``FileNotFoundError`` naming the folder or the missing shard, and ``ValueError`` for a
    pickle-only checkpoint (refused: loading pickle can run arbitrary code).
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:  # TypeError: the file holds a list, not an object
            raise ValueError(f"{index} is not a valid safetensors index: {type(err).__name__}: {err}") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} is not a valid safetensors index: its weight_map must map tensor names to file "
                             f"names, got {type(weight_map).__name__}")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} listed in {index} is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); jamba-local loads safetensors only. "
            "Convert them with transformers (save_pretrained(..., safe_serialization=True))."
        )
    raise FileNotFoundError(f"no *.safetensors weights in {folder}")


class SafetensorsFile:
    """One safetensors file, read with plain positional reads into the caller's tensors.

    Not memory-mapped on purpose: every page of an mmap that has been read stays in the process's resident
    set until the file is closed, so by the end of a load the whole file counts in RSS on top of the model
    (a float checkpoint loaded quantized would peak near twice its final size). Reading into the
    destination also saves the intermediate copy. The format: an 8-byte little-endian header length, a
    JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
    the tensors' bytes. Raises ``ValueError`` naming the file for a truncated or malformed one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        try:
            self._entries = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _error(self, what: str) -> ValueError:
        return ValueError(f"cannot read safetensors file {self.path}: {what} (truncated or corrupt?)")

    def _read_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._error(f"the file has {size} bytes, fewer than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise self._error(f"header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._error(f"its header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise self._error("its header is not a JSON object")
        header.pop("__metadata__", None)
        entries = {}
        for key, e in header.items():
            try:
                dtype, shape, (begin, end) = _ST_DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise self._error(f"bad header entry for {key!r} ({type(err).__name__}: {err})") from err
            if begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                raise self._error(f"tensor {key!r} spans bytes {begin}..{end}, not the size of a {e['dtype']} {list(shape)}")
            if 8 + n + end > size:
                raise self._error(f"tensor {key!r} ends at byte {8 + n + end}, past the end of the file ({size} bytes)")
            entries[key] = (dtype, shape, 8 + n + begin)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str, index: tuple = (), out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``key``, or its part ``tensor[index]`` (leading integers, then at most one slice: a
        contiguous byte range), into ``out`` (its shape; any dtype or device, converted through a bounded
        staging buffer when it is not the file's) or a new tensor of the file's dtype."""
        dtype, shape, offset = self._entries[key]
        start, part_shape = _contiguous_part(shape, index)
        if out is None:
            out = torch.empty(part_shape, dtype=dtype)
        n = math.prod(part_shape)
        offset += start * dtype.itemsize
        if out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
            self._read_into(offset, out)
            return out
        flat = out.view(-1)
        step = max(1, _CONVERT_CHUNK_BYTES // dtype.itemsize)
        staging = torch.empty(min(step, n), dtype=dtype)
        for a in range(0, n, step):
            part = staging[: min(step, n - a)]
            self._read_into(offset + a * dtype.itemsize, part)
            flat[a : a + part.numel()].copy_(part)
        return out

    def _read_into(self, offset: int, tensor: torch.Tensor) -> None:
        view = memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())
        self._file.seek(offset)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise self._error(f"unexpected end of file at byte {offset + done}")
            done += got

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _contiguous_part(shape: tuple[int, ...], index: tuple) -> tuple[int, tuple[int, ...]]:
    """Element offset and shape of ``tensor[index]`` in a contiguous tensor of ``shape``, for an index of
    leading integers and at most one final slice (step 1)."""
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    start, dims = 0, list(shape)
    for d, ix in enumerate(index):
        if isinstance(ix, slice):
            a, b, step = ix.indices(shape[d])
            if step != 1 or d != len(index) - 1:
                raise ValueError(f"index {index} does not select a contiguous part")
            start, dims[d] = start + a * strides[d], b - a
        else:
            start, dims[d] = start + ix * strides[d], None
    return start, tuple(x for x in dims if x is not None)


def _expert_targets(name: str, tensor_shape: tuple[int, ...]) -> list[tuple[str, tuple]] | None:
    """Map a fused expert tensor to (per-expert parameter name, index) pairs."""
    m = _FUSED.match(name)
    if not m:
        return None
    prefix, kind = m.groups()
    E = tensor_shape[0]
    if kind == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", (e,)) for e in range(E)]
    half = tensor_shape[1] // 2
    return [(f"{prefix}.{e}.gate_proj.weight", (e, slice(0, half))) for e in range(E)] + [
        (f"{prefix}.{e}.up_proj.weight", (e, slice(half, None))) for e in range(E)
    ]


def load_model(folder: Path, config: JambaConfig, dtype: torch.dtype = torch.float32, device="cpu", progress: bool = True,
               quantization=None) -> JambaForCausalLM:
    """Build the model and stream its weights in. Errors name the file and key at fault.

    ``quantization`` (a scheme name such as ``"int8"`` or a `jamba_core.quant.QuantConfig`) quantizes the
    target weights as they are read; a checkpoint saved by `jamba_core.quant.save_quantized` loads its
    stored quantized tensors as they are (its config says so), and ``quantization`` may then be omitted.
    """
    quant, saved_modules = resolve_for_checkpoint(config, quantization)
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    plan = LoadPlan(model, quant, dtype, device, saved_modules) if quant is not None else None
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    for name, p in params.items():
        target = torch.float32 if name.endswith(FP32_PARAMS) else dtype
        if p.dtype != target:
            p.data = torch.empty(p.shape, dtype=target, device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        params = dict(model.named_parameters())
    if torch.device(device).type == "cpu":
        place_in_huge_pages(model)  # before any weight is read: the storage to_empty gave is never touched
    expected = list(params) + (plan.expected() if plan else [])
    filled: set[str] = set()
    unexpected: list[str] = []
    files = weight_files(folder)
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress or None)
    for file in files:
        with SafetensorsFile(file) as f:
            for key in f.keys():
                shape = f.shape(key)
                targets = _expert_targets(key, shape) or [(key, ())]
                if all(t not in params and not (plan and plan.owns(t)) for t, _ in targets):
                    if not (config.tie_word_embeddings and key == "lm_head.weight"):
                        unexpected.append(key)
                    continue
                for target, index in targets:
                    quantized = plan is not None and plan.owns(target)
                    p = params.get(target)
                    if p is None and not quantized:
                        unexpected.append(target)
                        continue
                    want = plan.shape(target) if quantized else tuple(p.shape)
                    part_shape = _contiguous_part(shape, index)[1]
                    if want is not None and part_shape != tuple(want):
                        raise ValueError(
                            f"{file.name}: tensor {key!r} has shape {part_shape} but the config "
                            f"({folder / 'config.json'}) implies {tuple(want)} for {target!r}"
                        )
                    # a float weight in the model, or one quantized as it loads (from floats; a saved one is int)
                    float_weight = not plan.saved if quantized else p.dtype.is_floating_point
                    if float_weight and not f.dtype(key).is_floating_point:
                        raise ValueError(f"{file.name}: tensor {key!r} is stored as {f.dtype(key)}, not a float dtype; "
                                         f"{target!r} is a float weight (a quantized checkpoint needs its "
                                         "quantization_config in config.json)")
                    with torch.no_grad():
                        if quantized:
                            plan.load(target, f.read(key, index))  # one float tensor, quantized and released
                        else:
                            f.read(key, index, out=p.data)
                    filled.add(target)
                    bar.update(1)
    bar.close()
    missing = [n for n in expected if n not in filled]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint {folder} lacks {len(missing)} weights the config needs: {shown}")
    if unexpected:
        log.warning("ignored %d tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    model.eval()
    return model


HUGE_PAGE_BYTES = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line (the kernels' AVX-512 loads)


def huge_page_empty(like: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """New uninitialised CPU tensors of ``like``'s shapes and dtypes, inside one anonymous mapping advised
    ``MADV_HUGEPAGE`` and aligned to 2 MiB, so the kernel backs it with transparent huge pages where the
    system allows them (``/sys/kernel/mm/transparent_hugepage/enabled``: "always" or "madvise"). Each
    starts on a 64-byte line and has a storage of its own, so saving them (safetensors) sees no shared
    storage. When a tensor's storage is freed, the whole pages inside it go back to the system
    (``MADV_DONTNEED``): replacing some weights (`jamba_core.quant.quantize_model`) frees their memory as
    with torch's allocator, and the mapping itself goes when the last tensor does. None off Linux, with
    ``JAMBA_LOCAL_HUGE_PAGES=0``, or when the mapping cannot be made."""
    if os.environ.get("JAMBA_LOCAL_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    offsets, total = [], 0
    for t in like:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    if not total:
        return None
    try:
        arena = mmap.mmap(-1, total + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as e:
        log.debug("no huge-page mapping of %d bytes: %s", total, e)
        return None
    start = -ctypes.addressof(ctypes.c_char.from_buffer(arena)) % HUGE_PAGE_BYTES
    out = []
    for t, o in zip(like, offsets):
        n = t.numel() * t.element_size()
        if not n:
            out.append(torch.empty(t.shape, dtype=t.dtype))
            continue
        # a buffer object per tensor: torch holds it until the storage is freed, then its finalizer runs
        view = (ctypes.c_char * n).from_buffer(arena, start + o)
        weakref.finalize(view, _release_pages, arena, start + o, n).atexit = False
        out.append(torch.frombuffer(view, dtype=t.dtype).view(t.shape))
    return out


def _release_pages(arena: mmap.mmap, offset: int, n: int) -> None:
    """Give back the whole pages of ``arena[offset:offset + n]`` (a freed tensor's; the pages it shares
    with its neighbours stay)."""
    lo, hi = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE, (offset + n) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        try:
            arena.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # a closed mapping: nothing left to give back
            pass


def place_in_huge_pages(model: torch.nn.Module) -> int:
    """Give every CPU parameter and buffer of ``model`` new, uninitialised storage from `huge_page_empty`.
    The contents are NOT copied: call it on a model whose weights are still to be read. Parameters keep
    their objects (``.data`` is set; tied ones stay tied), buffers are replaced in their modules. Tensor
    subclasses (bitsandbytes' parameters), tensors sharing a storage with another, meta tensors and other
    devices are left alone. Returns the bytes placed: 0 where `huge_page_empty` gives None (the storage is
    then unchanged)."""
    slots, unique = [], {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is not None and t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter):
                    slots.append((module, kind, name, t))
                    unique.setdefault(id(t), t)
    # tensors that are views of one another (distinct objects, one storage) would lose the link: left alone
    storages = Counter(t.untyped_storage().data_ptr() for t in unique.values() if t.numel())
    unique = {i: t for i, t in unique.items() if not t.numel() or storages[t.untyped_storage().data_ptr()] == 1}
    slots = [slot for slot in slots if id(slot[3]) in unique]
    placed = huge_page_empty(list(unique.values()))
    if placed is None:
        return 0
    new = dict(zip(unique, placed))
    for module, kind, name, t in slots:
        if kind == "_parameters":
            t.data = new[id(t)]
        else:
            module._buffers[name] = new[id(t)]
    return sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in placed)


__all__ = ["could_be_hub_id", "resolve_checkpoint", "weight_files", "load_model", "load_config", "SafetensorsFile",
           "huge_page_empty", "place_in_huge_pages"]
