"""The generation engine: prefill, decode, sampling, stop handling, streaming, usage.

``prefill`` runs the prompt through the model in chunks of ``prefill_chunk_tokens`` (Mamba layers carry
conv + SSM state from chunk to chunk, attention layers append K/V), computing logits for the last
position only, so activation memory is bounded by the chunk. ``decode_one_token`` then feeds one
token at a time through the same cache.
"""

from __future__ import annotations

import numbers
import operator
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .cache import KV_BLOCK, HybridCache, PrefixCache
from .config import JambaConfig, load_config
from .loading import load_model, resolve_checkpoint
from .memory import _dtype, estimate_memory
from .tokenizer import control_token_ids, load_tokenizer, stop_token_ids

DEFAULT_PREFILL_CHUNK = 2048
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
ANSWER_RESERVE = 4 * KV_BLOCK  # tokens of K/V room a generation allocates up front for its answer


@dataclass
class Usage:
    """Token counts of one request. ``cached_tokens``: prompt tokens read from a reused prefix state."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Seconds and tokens/s of one request. Time to first token covers prefill and the first sample."""

    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


# the most alternatives a request's ``logprobs`` may ask per token (vLLM's default max_logprobs, OpenAI's
# top_logprobs limit)
MAX_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """One generated token's log-probability (natural log) under the model's distribution at that step:
    ``log_softmax`` of its fp32 logits before any constraint mask, temperature, top-k or top-p (vLLM's
    default "raw" logprobs), so that a token a grammar forced shows how likely the model found it.
    ``token``: the token's text alone (U+FFFD where it holds part of a UTF-8 character); ``bytes``: its exact
    bytes (those parts included; ``<|eom|>``-style special tokens as their text). ``top_logprobs``: the
    ``logprobs`` most likely tokens at that step, most likely first (their own ``top_logprobs`` empty); the
    chosen token is among them only when it ranks there."""

    token_id: int
    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list["TokenLogprob"] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked


@dataclass
class StreamChunk:
    """A text delta (valid UTF-8). The last chunk carries ``finish_reason``, ``usage`` and ``timings``.
    ``logprobs``: when the request asked, one `TokenLogprob` per entry of ``token_ids``."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None


def _token_id(t) -> int:
    """One caller-given token id as an int: ints, numpy integers and integer 0-d tensors pass
    (``operator.index``); a bool (Python, numpy or tensor) is refused, though Python counts it an int."""
    if isinstance(t, bool) or str(getattr(t, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(f"prompt must be text, a list of token ids, or a list of chat message dicts; got the bool {t!r}")
    try:
        return operator.index(t)
    except TypeError:
        raise TypeError("prompt must be text, a list of token ids, or a list of chat message dicts; got the element "
                        f"{t!r} ({type(t).__name__})") from None


class Engine:
    """A loaded Jamba checkpoint and the loop that generates from it.

    Attributes: ``config`` (JambaConfig), ``tokenizer`` (a transformers tokenizer), ``model``
    (`JambaForCausalLM`), ``dtype``, ``kv_dtype``, ``device``, ``path``. Requests are serialised by a lock, so one
    engine can be shared by threads (each request has its own cache).
    """

    def __init__(self, model, config: JambaConfig, tokenizer, path: Path | None = None, prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, kv_cache_dtype=None):
        self.model, self.config, self.tokenizer, self.path = model, config, tokenizer, path
        self.dtype = model.compute_dtype  # not lm_head's: a quantized head holds int8
        self.kv_dtype = _dtype(kv_cache_dtype) if kv_cache_dtype is not None else self.dtype
        self.device = model.model.embed_tokens.weight.device
        if isinstance(prefill_chunk_tokens, bool) or not isinstance(prefill_chunk_tokens, numbers.Integral) or prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be an integer >= 1, got {prefill_chunk_tokens!r}")
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.stop_ids = stop_token_ids(tokenizer, config)
        self._control_ids = control_token_ids(tokenizer)
        self._token_bytes: list[bytes] | None = None  # token_bytes(), read on first use
        self.lock = threading.RLock()
        self.last_request: dict | None = None  # usage, timings and cache bytes of the latest request
        # prefix-state reuse: snapshots at message boundaries (after each <|eom|> or <|im_end|>) and at the end of
        # every prompt; 0 bytes turns it off
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        vocab = tokenizer.get_vocab()
        self._boundary_ids = {vocab[t] for t in ("<|eom|>", "<|im_end|>") if t in vocab}  # Jamba's and ChatML's

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype="float32", device="cpu", quantization: str | None = None,
                        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK, progress: bool = True,
                        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, kv_cache_dtype=None) -> "Engine":
        """Load a checkpoint folder (or a Hub id, offline when cached).

        ``dtype``: "float32" or "bfloat16" (or a torch dtype) for the weights; SSM state, scan and
        RMSNorm always run in fp32. "float16" also loads and runs (for a GPU), but on CPU it takes torch's
        float16 path, which has none of the C++ kernels (bench-small decodes 11 tokens/s against bf16's 93):
        use "bfloat16" there. ``quantization``: None, ``"int8"``, ``"bnb-int8"`` or ``"bnb-nf4"`` (optionally
        ``"+attention"`` / ``"+mamba"`` / ``"+lm_head"``, or a `jamba_core.quant.QuantConfig`), applied to each
        weight as it is read; a checkpoint saved by `jamba_core.quant.save_quantized` loads quantized as it is.
        Raises ``FileNotFoundError`` / ``ValueError`` naming the file or key at fault (see `jamba_core.loading`).
        ``kv_cache_dtype``: the attention layers' K/V cache dtype when it should differ from the compute
        dtype: "bfloat16" with fp32 weights halves the KV cache (as llama.cpp's f16 cache does) and runs
        prefill attention in bf16 (our flash kernel on an AVX512-BF16 CPU); attention then computes on bf16
        K/V and queries, scores, softmax and sums staying fp32. ``device``: a torch
        device ("cpu", "cuda", "cuda:1"); ``ValueError`` for one torch cannot name or this build cannot use.
        """
        check_device(device)
        folder = resolve_checkpoint(path_or_hub_id)
        config = load_config(folder)
        tokenizer = load_tokenizer(folder)
        model = load_model(folder, config, dtype=_dtype(dtype), device=device, progress=progress, quantization=quantization)
        return cls(model, config, tokenizer, folder, prefill_chunk_tokens, prefix_cache_bytes, kv_cache_dtype)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def context_window(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def model_name(self) -> str:
        return self.path.name if self.path is not None else "jamba"

    def render(self, messages: Sequence[dict], tools=None, documents=None, response_format=None, citations: bool = False, **kwargs) -> str:
        """Chat messages (+ tools, documents) -> prompt text with the checkpoint's chat template."""
        from .chat import render_chat

        return render_chat(self.tokenizer, messages, tools=tools, documents=documents,
                           response_format=response_format, citations=citations, **kwargs)

    def encode(self, prompt, tools=None, documents=None, response_format=None, citations: bool = False) -> list[int]:
        """Text (BOS added as the tokenizer does), token ids, or chat messages -> token ids.

        Token ids may be Python ints, numpy integers or a 1-D integer tensor / array (as a tokenizer's
        ``return_tensors`` gives, its batch row taken); bools and floats raise ``TypeError``."""
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (str, Iterable)):
            raise TypeError(f"prompt must be text, a list of token ids, or a list of chat message dicts, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            if tools or documents:
                return self.encode([{"role": "user", "content": prompt}], tools, documents, response_format, citations)
            return self._checked(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            text = self.render(prompt, tools=tools, documents=documents, response_format=response_format, citations=citations)
            return self._checked(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        prompt = [_token_id(t) for t in prompt]
        bad = next((t for t in prompt if not 0 <= t < self.config.vocab_size), None)  # ids the caller gave
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return prompt

    def _checked(self, ids) -> list[int]:
        """The tokenizer's ids, refused where one is past the model's vocabulary (a tokenizer that does
        not belong to the checkpoint: the embedding would raise IndexError)."""
        ids = list(ids)
        if ids and max(ids) >= self.config.vocab_size:
            raise ValueError(f"the tokenizer gave token id {max(ids)}, past the model's vocabulary (vocab_size "
                             f"{self.config.vocab_size}; the tokenizer has {len(self.tokenizer)} tokens): the tokenizer "
                             f"files do not match the checkpoint{f' at {self.path}' if self.path else ''}")
        return ids

    def count_tokens(self, prompt, tools=None, documents=None, response_format=None, citations: bool = False) -> int:
        """Exact prompt token count through the same rendering as generation."""
        return len(self.encode(prompt, tools, documents, response_format, citations))

    def token_bytes(self) -> list[bytes]:
        """Each token id's exact bytes (``config.vocab_size`` entries; b"" past the tokenizer's), read once
        from xgrammar's decoding of the vocabulary (byte-level, byte-fallback or raw, detected from the
        tokenizer); special tokens as their text. Raises ``ImportError`` without xgrammar."""
        if self._token_bytes is None:
            from .chat.grammar import _xgr

            size = max(self.config.vocab_size, len(self.tokenizer))
            info = _xgr().TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=size)
            self._token_bytes = list(info.decoded_vocab)  # a copy: xgrammar rebuilds the list on every read
        return self._token_bytes

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, dropping control tokens (BOS, EOS, eom, roles) but keeping the tool-call
        and citation markers, which parsers need."""
        kept = [i for i in ids if i not in self._control_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- the two phases ------------------------------------------------------------------------
    def new_cache(self, batch_size: int = 1, capacity: int = 0) -> HybridCache:
        return HybridCache(self.config, batch_size, self.dtype, self.device, capacity, kv_dtype=self.kv_dtype)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: HybridCache, attention_mask: torch.Tensor | None = None, on_chunk=None) -> torch.Tensor:
        """Run ``ids`` ``(b, L)`` through the model in chunks; return last-position logits ``(b, vocab)`` fp32."""
        L = ids.shape[1]
        chunk = self.prefill_chunk_tokens
        logits = None
        for s in range(0, L, chunk):
            e = min(s + chunk, L)
            mask = None if attention_mask is None else attention_mask[:, s:e]
            logits = self.model(ids[:, s:e], cache=cache, attention_mask=mask, logits_to_keep=1 if e == L else 0)
            if on_chunk is not None:
                on_chunk(e - s)
        return logits[:, -1].float()

    @torch.no_grad()
    def decode_one_token(self, token: torch.Tensor, cache: HybridCache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step: ``token`` ``(b, 1)`` -> logits ``(b, vocab)`` fp32."""
        return self.model(token, cache=cache, attention_mask=attention_mask)[:, -1].float()

    # -- generation ----------------------------------------------------------------------------
    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ``ValueError`` when prompt + new tokens exceed the context window, saying how many
        tokens and how much cache memory the request would need."""
        need = prompt_tokens + max_new_tokens
        if need > self.context_window:
            est = estimate_memory(self.config, need, 1, self.dtype, self.prefill_chunk_tokens, kv_cache_dtype=self.kv_dtype)
            raise ValueError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} = {need} tokens exceeds the "
                f"model's context window of {self.context_window} tokens (config max_position_embeddings); it would "
                f"need {_size(est.kv_cache + est.mamba_state)} of cache. Shorten the prompt or lower max_new_tokens."
            )

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """Generate a completion. Arguments as `stream`. Returns the whole text, ids, finish reason,
        usage and timings."""
        text, ids, last = [], [], None
        logprobs = [] if kwargs.get("logprobs") is not None else None
        for chunk in self.stream(prompt, **kwargs):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            if logprobs is not None and chunk.logprobs:
                logprobs.extend(chunk.logprobs)
            last = chunk
        return GenerationResult("".join(text), ids, last.finish_reason, last.usage, last.timings, logprobs)

    def stream(self, prompt, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop: Sequence[str] | str | None = None, tools=None, documents=None,
               response_format=None, citations: bool = False, constraint: Any = None,
               logprobs: int | None = None, markup: tuple[str, str] | None = None) -> Iterator[StreamChunk]:
        """Generate, yielding text deltas as they become valid UTF-8.

        ``prompt``: text, token ids, or chat messages (rendered with the checkpoint's chat template,
        with ``tools`` / ``documents``). ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable
        those filters; ``seed`` makes sampling reproducible. Generation ends at any id of the config's
        ``eos_token_id`` (and ``<|eom|>``), at a ``stop`` string (never echoed, found even when it spans
        tokens; not inside a constraint's structured output, whose own fixed text may hold one, nor between
        ``markup``'s open and close markers, such as a free tool call's ``<tool_calls>`` and ``</tool_calls>``), when
        ``constraint`` (see `jamba_core.chat.grammar`) terminates (``finish_reason`` "stop"), or after
        ``max_new_tokens`` ("length"). Raises ``ValueError`` for an empty prompt, token
        ids outside the vocabulary, ``max_new_tokens < 1``, ``temperature < 0``, ``top_k < 0``, ``top_p``
        outside (0, 1], or a prompt that does not fit the context window; ``TypeError`` for a prompt of
        another type or a non-integer ``max_new_tokens``. Empty stop strings are ignored.

        ``logprobs``: None (the default: none computed), or the number of most likely alternatives, 0 to
        `MAX_LOGPROBS`, to report with each generated token's own log-probability (`TokenLogprob`, in each
        chunk's ``logprobs``); ``ValueError`` outside that range. The first request with logprobs reads the
        vocabulary's token bytes through xgrammar (the "grammar" extra), once per engine.

        The engine runs one request at a time: from its first chunk until it is exhausted, closed
        (``.close()``) or dropped (breaking out of ``for chunk in engine.stream(...)`` drops the last
        reference, and CPython closes it at once), a stream holds the engine's lock, and other threads'
        requests wait for it: a stream kept in a variable and left unread blocks them. In one thread, a
        second request interleaved with an open stream runs on a cache of its own.
        """
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
        check_logprobs(logprobs)
        logprobs = None if logprobs is None else operator.index(logprobs)
        if prompt is None:
            raise TypeError("prompt must be text, a list of token ids, or a list of chat message dicts, got None")
        ids = [] if isinstance(prompt, str) and not prompt else self.encode(prompt, tools, documents, response_format, citations)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token of text")
        self.check_fits(len(ids), max_new_tokens)
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        with self.lock:
            yield from self._generate(ids, max_new_tokens, temperature, top_p, top_k, seed, stops, constraint, logprobs, markup)

    # -- prefix-state reuse -----------------------------------------------------------------------
    def start(self, ids: list[int], capacity: int = 0) -> tuple[HybridCache, int, torch.Tensor]:
        """A cache holding ``ids`` and the last position's logits ``(vocab,)``, resumed from the longest
        snapshot whose ids start ``ids`` (only the rest is prefilled). Snapshots are taken at message
        boundaries and at the end. Returns ``(cache, reused_tokens, logits)``."""
        hit = self.prefix_cache.lookup(ids) if self.prefix_cache.budget_bytes > 0 else None
        if hit is None:
            cache, start, logits = self.new_cache(1, capacity=max(capacity, len(ids))), 0, None
        else:
            start, snapshot, logits = hit
            cache = snapshot.restore(self.config, max(capacity, len(ids)))
            logits = None if logits is None else logits.clone()  # sampling masks logits in place
        if start < len(ids):
            logits = self._prefill_with_snapshots(ids, cache, start)
        return cache, start, logits

    def _prefill_with_snapshots(self, ids: list[int], cache: HybridCache, start: int) -> torch.Tensor:
        if self.prefix_cache.budget_bytes <= 0:
            return self.prefill(torch.tensor([ids[start:]], device=self.device), cache)[0]
        cuts = sorted({p + 1 for p in range(start, len(ids)) if ids[p] in self._boundary_ids} | {len(ids)})
        logits = None
        for a, b in zip([start, *cuts], cuts):
            if b <= a:
                continue
            logits = self.prefill(torch.tensor([ids[a:b]], device=self.device), cache)[0]
            self.prefix_cache.add(ids[:b], cache.snapshot(), logits.clone() if b == len(ids) else None)
        return logits

    def pin(self, prefix, tools=None, documents=None, citations: bool = False) -> tuple:
        """Prefill ``prefix`` once and keep its state until `release`: text, chat messages (the
        conversation before the question), or documents (with optional messages and tools). Later
        requests whose prompt starts with the same tokens prefill only the rest. Returns a handle.

        For messages and documents, the pinned prefix is what the rendered chat holds before the next
        user question's text (whatever the chat template), so any question asked with the same
        documents (and messages, tools) reuses it. A text prefix is reused when the longer prompt
        tokenizes to the same leading ids: end it at a token boundary (a newline), since BPE may merge a
        trailing space with the next word. Raises ``ValueError`` for an empty prefix, or where the
        engine's prefix cache is off (``prefix_cache_bytes=0``: nothing would ever be reused).
        """
        if self.prefix_cache.budget_bytes <= 0:
            raise ValueError("pin needs the prefix cache, which this engine has off (prefix_cache_bytes=0): "
                             "nothing pinned would be reused")
        if isinstance(prefix, str) and not prefix and not documents and not tools:
            raise ValueError("nothing to pin: the prefix is empty")
        if isinstance(prefix, str) and not documents and not tools:
            ids = self.encode(prefix)
        else:
            messages = [{"role": "user", "content": prefix}] if isinstance(prefix, str) else list(prefix or [])
            # what every question after these messages shares: the common start of two renderings with
            # different questions (any template: Jamba's <|bom|><|user|>, ChatML's <|im_start|>user)
            a, b = (self.encode([*messages, {"role": "user", "content": q}], tools, documents, citations=citations)
                    for q in ("A", "Z"))
            ids = a[:next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))]
        if not ids:
            raise ValueError("nothing to pin: the prefix is empty")
        with self.lock:
            cache, _, logits = self.start(ids)
            return self.prefix_cache.add(ids, cache.snapshot(), logits.clone(), pinned=True)

    def release(self, handle: tuple) -> None:
        """Unpin a prefix from `pin`; it stays cached until evicted (least recently used). Raises
        ``ValueError`` for a handle that is not pinned (not from `pin`, or released already)."""
        with self.lock:
            entry = self.prefix_cache.entries.get(handle) if isinstance(handle, tuple) else None
            if entry is None or not entry["pinned"]:
                raise ValueError("not a pinned prefix: the handle is not from pin, or was released already")
            self.prefix_cache.unpin(handle)

    def _generate(self, ids, max_new_tokens, temperature, top_p, top_k, seed, stops, constraint, logprobs=None, markup=None):
        t0 = time.perf_counter()
        # K/V room for the answer up front, up to `ANSWER_RESERVE` tokens (the cache grows past it by
        # KV_BLOCK): max_new_tokens may be the whole window (ChatJamba's max_tokens=None), 4 GiB of K/V
        # for Jamba 1.5 Mini at 256K, which a GPU would hold for every short answer
        cache, reused, logits = self.start(ids, capacity=len(ids) + min(max_new_tokens, ANSWER_RESERVE))
        t_prefill = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        out_ids: list[int] = []
        sent = ""  # text already yielded
        detok = _Detokenizer(self.decode)
        finish = "length"
        hit_stop_string = False
        ttft = None
        free_text = getattr(constraint, "stop_strings_apply", True)
        token_bytes = self.token_bytes() if logprobs is not None else None
        entry = None  # the step's TokenLogprob in a list, when asked
        for step in range(max_new_tokens):
            if logprobs is not None:  # the model's own distribution: before the constraint masks the logits
                log_p = torch.log_softmax(logits.float(), -1)
            if constraint is not None:
                if hasattr(constraint, "remaining_tokens"):  # lets a grammar close within the budget
                    constraint.remaining_tokens = max_new_tokens - step
                constraint.mask_logits(logits)
            token = sample(logits, temperature, top_p, top_k, generator)
            if ttft is None:
                ttft = time.perf_counter() - t0
            if token in self.stop_ids:
                finish = "stop"
                break
            out_ids.append(token)
            if logprobs is not None:
                entry = [_token_logprob(token, float(log_p[token]), token_bytes)]
                if logprobs:
                    top = torch.topk(log_p, logprobs)
                    entry[0].top_logprobs = [_token_logprob(i, v, token_bytes)
                                             for v, i in zip(top.values.tolist(), top.indices.tolist())]
            if constraint is not None:
                constraint.accept(token)
            text = detok.text(out_ids)
            cut = _find_stop(text, stops, markup) if free_text else None
            if cut is not None:
                finish, hit_stop_string = "stop", True
                yield StreamChunk(text[len(sent):cut] if cut > len(sent) else "", [token], logprobs=entry)
                break
            # hold back an incomplete UTF-8 character and a possible stop-string prefix
            safe = len(text.rstrip("\ufffd"))
            if stops and free_text:
                safe = min(safe, _stop_prefix_start(text, stops, markup))
            yield StreamChunk(text[len(sent):safe] if safe > len(sent) else "", [token], logprobs=entry)
            sent = text[: max(safe, len(sent))]
            if constraint is not None and constraint.is_terminated():
                finish = "stop"
                break
            if step + 1 < max_new_tokens:
                logits = self.decode_one_token(torch.tensor([[token]], device=self.device), cache)[0]
        if not hit_stop_string:
            text = self.decode(out_ids)
            if len(text) > len(sent):
                yield StreamChunk(text[len(sent):])
        t_end = time.perf_counter()
        prefill_s = t_prefill - t0
        decode_s = t_end - t_prefill
        n = len(out_ids)
        timings = Timings(
            time_to_first_token_s=ttft or prefill_s,
            prefill_s=prefill_s,
            decode_s=decode_s,
            prefill_tokens_per_s=(len(ids) - reused) / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=(n - 1) / (t_end - t0 - (ttft or prefill_s)) if n > 1 else 0.0,
        )
        usage = Usage(len(ids), n, reused)
        self.last_request = {"usage": usage, "timings": timings, "cache_nbytes": cache.nbytes}
        yield StreamChunk("", [], finish, usage, timings)


def _token_logprob(token: int, logprob: float, token_bytes: list[bytes]) -> TokenLogprob:
    raw = token_bytes[token] if token < len(token_bytes) else b""
    return TokenLogprob(token, raw.decode("utf-8", errors="replace"), list(raw), logprob)


def check_logprobs(logprobs, name: str = "logprobs") -> None:
    """Raise ``ValueError`` unless ``logprobs`` is None or an integer in 0..`MAX_LOGPROBS` (bools refused);
    ``name``: the setting's name in the message (an adapter's ``top_logprobs``)."""
    if logprobs is None:
        return
    if isinstance(logprobs, bool) or not hasattr(logprobs, "__index__") or not 0 <= logprobs <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be None or an integer in 0..{MAX_LOGPROBS}, got {logprobs!r} (the alternatives "
                         "reported per token; 0 reports the chosen token's alone)")


class _Detokenizer:
    """Text of a growing list of ids without decoding it all at every step (quadratic in the output).

    vLLM's incremental detokenization: decode only the ids from ``prefix`` on, and take what the ids past
    ``read`` add to it. The few ids between ``prefix`` and ``read`` give the tokenizer its context (a
    SentencePiece decoder drops a leading space at the start of a decode, byte-level BPE may be mid
    character). Text ending in an incomplete UTF-8 character (U+FFFD) is not committed yet.
    """

    def __init__(self, decode):
        self._decode = decode
        self.prefix = self.read = 0
        self.committed = ""

    def text(self, ids) -> str:
        before = self._decode(ids[self.prefix : self.read])
        after = self._decode(ids[self.prefix :])
        new = after[len(before):] if after.startswith(before) else self._decode(ids)[len(self.committed):]
        if new.endswith("\ufffd"):
            return self.committed + new
        self.committed += new
        self.prefix, self.read = max(self.read - 4, 0), len(ids)
        return self.committed


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None) -> int:
    """Pick a token from 1-D logits: argmax at temperature 0, else softmax(logits / T) after top-k and
    top-p (nucleus, Holtzman et al. 2020) filtering."""
    if temperature <= 0:
        if (logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad
                and not logits.is_neg()):  # numpy cannot take a lazily negated view
            return int(logits.numpy().argmax())  # the same first maximum (NaN counts as one); 8 us against
            # torch's 60 us over a 65K vocabulary (2 threads), 1% of a bench-small bf16 decode step
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    if generator is not None and probs.device != generator.device:  # a seeded draw on CUDA logits: CPU generator
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_device(device) -> None:
    """Raise ``ValueError`` for a device torch cannot parse, a device type other than CPU and CUDA, or CUDA
    where this torch build or machine has none."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {device!r} asked, but {why}; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, meta, ...: no kernels or tests here
        raise ValueError(f"device {device!r}: jamba-local runs on 'cpu' and 'cuda' only")


def _size(nbytes: int) -> str:
    """Bytes in GiB, or MiB below 1 GiB (a small model's cache read "0.00 GiB")."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def warn_unknown_options(owner: str, given, fields: dict, accepted: Sequence[str] = (), stacklevel: int = 3) -> None:
    """Warn (``UserWarning``) about constructor options ``owner`` has no field for: pydantic drops them
    without a word, so a misspelt ``max_tokens`` left the default in force. ``fields``: the class's
    ``model_fields``, whose aliases count too; ``accepted``: names taken and ignored on purpose;
    ``stacklevel``: as ``warnings.warn``'s, counted from the caller (the warning names the user's line)."""
    import difflib
    import warnings

    known = set(fields) | {f.alias for f in fields.values() if f.alias} | set(accepted)
    for name in sorted(set(given) - known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        warnings.warn(f"{owner} has no option {name!r}; it is ignored" + (f" (did you mean {close[0]!r}?)" if close else ""),
                      UserWarning, stacklevel=stacklevel + 1)


def check_sampling(max_new_tokens, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed=None) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-integer count or seed, or a temperature or top_p that is
    not a number) for sampling settings no sampler takes: ``max_new_tokens < 1``, ``temperature < 0``,
    ``top_p`` outside (0, 1], ``top_k < 0``, a ``seed`` outside torch's range (-2^63 .. 2^64 - 1); the
    adapters call it when they are built, so that a bad setting fails there rather than at the first call."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in -2**63 .. 2**64 - 1 (torch's generator), got {seed}")
    try:
        if isinstance(max_new_tokens, bool):  # True is not a count
            raise TypeError
        max_new_tokens = operator.index(max_new_tokens)  # ints and integer scalars, not 2.5
    except TypeError:
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}") from None
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")
    if isinstance(top_k, bool) or not hasattr(top_k, "__index__") or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")


def _free_spans(text: str, markup: tuple[str, str] | None) -> list[tuple[int, int]]:
    """The (start, end) spans of ``text`` outside ``markup``'s blocks (open marker to close marker; a block
    not closed yet runs to the end)."""
    if not markup:
        return [(0, len(text))]
    opener, closer = markup
    spans, pos = [], 0
    while (i := text.find(opener, pos)) >= 0:
        spans.append((pos, i))
        j = text.find(closer, i + len(opener))
        if j < 0:
            return spans
        pos = j + len(closer)
    return spans + [(pos, len(text))]


def _find_stop(text: str, stops: list[str], markup: tuple[str, str] | None = None) -> int | None:
    """Index of the earliest stop string in ``text`` outside ``markup``'s blocks (None if absent)."""
    if not stops:  # every generated token asks: no scan of the text for markers when there is nothing to find
        return None
    hits = [a + i for a, b in _free_spans(text, markup) for s in stops if (i := text[a:b].find(s)) >= 0]
    return min(hits) if hits else None


def _stop_prefix_start(text: str, stops: list[str], markup: tuple[str, str] | None = None) -> int:
    """Where a suffix of ``text`` that could begin a stop string starts (len(text) if none, or if the
    text ends inside a ``markup`` block)."""
    a, b = _free_spans(text, markup)[-1]
    if b < len(text):
        return len(text)
    for k in range(min(len(text) - a, max(len(s) for s in stops) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return len(text) - k
    return len(text)


_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model: str | Path | Engine, dtype="float32", device="cpu", quantization: str | None = None, kv_cache_dtype=None,
               **kwargs) -> Engine:
    """The process-wide engine for a checkpoint and settings, loaded on first use and shared by every
    adapter instance that asks for the same ones (an `Engine` passed in is returned as is)."""
    if isinstance(model, Engine):
        return model
    key = (str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else str(model), str(dtype), str(device), quantization,
           str(kv_cache_dtype), tuple(sorted(kwargs.items())))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = Engine.from_pretrained(model, dtype=dtype, device=device, quantization=quantization,
                                                            kv_cache_dtype=kv_cache_dtype, **kwargs)
        return engine
