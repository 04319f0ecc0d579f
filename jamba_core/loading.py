"""Checkpoint folder or Hub id -> model, streaming safetensors tensor by tensor.

Only safetensors are read (never pickle, never remote code). The model is built on the meta device,
given real storage once (``to_empty``), then each parameter is filled straight from the memory-mapped
file, so peak memory is the loaded model plus one tensor. Expert weights load from the Hub's per-expert
names (``feed_forward.experts.{e}.gate_proj.weight``) and from the fused layout that `transformers` 5
uses in memory (``feed_forward.experts.gate_up_proj`` ``(E, 2I, H)``, ``feed_forward.experts.down_proj``
``(E, H, I)``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .config import JambaConfig, load_config
from .model import JambaForCausalLM

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FP32_PARAMS = ("A_log", ".D")  # SSM parameters kept in fp32 whatever the weight dtype
_FUSED = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hub id fetched (or found in the cache, offline) with
    ``huggingface_hub.snapshot_download``, safetensors and JSON/tokenizer files only."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    text = str(path_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {text} does not exist (and it is not a Hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]))
    except Exception as err:  # offline, unknown repo, no network: say what to do
        raise FileNotFoundError(
            f"could not get Hub checkpoint {text!r} ({type(err).__name__}: {err}). Download it first or pass a local folder."
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
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index} is not a valid safetensors index: {err}") from err
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


def load_model(folder: Path, config: JambaConfig, dtype: torch.dtype = torch.float32, device="cpu", progress: bool = True) -> JambaForCausalLM:
    """Build the model and stream its weights in. Errors name the file and key at fault."""
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    for name, p in params.items():
        target = torch.float32 if name.endswith(FP32_PARAMS) else dtype
        if p.dtype != target:
            p.data = torch.empty(p.shape, dtype=target, device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        params = dict(model.named_parameters())
    filled: set[str] = set()
    unexpected: list[str] = []
    files = weight_files(folder)
    bar = tqdm(total=len(params), desc="loading weights", unit="tensor", disable=not progress or None)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    targets = _expert_targets(key, shape) or [(key, ())]
                    if all(t not in params for t, _ in targets):
                        if not (config.tie_word_embeddings and key == "lm_head.weight"):
                            unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    for target, index in targets:
                        p = params.get(target)
                        if p is None:
                            unexpected.append(target)
                            continue
                        part = tensor[index] if index else tensor
                        if tuple(part.shape) != tuple(p.shape):
                            raise ValueError(
                                f"{file.name}: tensor {key!r} has shape {tuple(part.shape)} but the config "
                                f"({folder / 'config.json'}) implies {tuple(p.shape)} for {target!r}"
                            )
                        with torch.no_grad():
                            p.copy_(part)
                        filled.add(target)
                        bar.update(1)
                    del tensor
        except SafetensorError as err:
            raise ValueError(f"cannot read safetensors file {file}: {err} (truncated or corrupt?)") from err
    bar.close()
    missing = [n for n in params if n not in filled]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint {folder} lacks {len(missing)} weights the config needs: {shown}")
    if unexpected:
        log.warning("ignored %d tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    model.eval()
    return model


__all__ = ["resolve_checkpoint", "weight_files", "load_model", "load_config"]
