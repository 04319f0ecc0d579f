"""Grammar-constrained decoding: ``tool_choice`` and ``response_format`` as a token mask, with xgrammar.

The engine's constraint protocol (batch 1, one call each per decode step)::

    constraint.mask_logits(logits)   # logits: (vocab,) in place; disallowed -> -inf
    constraint.accept(token_id)      # the sampled token
    constraint.is_terminated()       # True once the constrained output is complete (its end token taken)

Why a small automaton around xgrammar rather than one grammar: the call markers (``<tool_calls>``,
``</tool_calls>``, and ``<tool_call>`` in ChatML tokenizers) are single special tokens, but xgrammar matches
every token by its text, so a literal ``"<tool_calls>"`` in a grammar would also admit the marker spelled in
ordinary pieces (``<``, ``tool``, ...), and special tokens would be admitted inside JSON strings. So the
xgrammar vocabulary here has the special and markup tokens blanked (never matchable as text); the
automaton forces the marker tokens itself between grammar steps, and a grammar step ends on the token that
the next step starts with (xgrammar's per-matcher stop tokens). The JSON inside is what the checkpoint's chat
template writes: ``[\\n    {"name": "f", "arguments": {...}},\\n    ...\\n]`` for Jamba, compact JSON with
``", "`` and ``": "`` separators.

xgrammar (not llguidance): on a 65536-token vocabulary on this CPU both compute a mask in about 0.01-0.03
ms (median; applying it to the logits costs about 0.15-0.25 ms more); llguidance compiles a schema faster
(1-6 ms against 30-60), but compiled grammars are cached per tokenizer here, and xgrammar is the
project's dependency (benchmarks/grammar_overhead.py measures both). Two xgrammar 0.2.9 defects are worked
around: a length-bounded string (``minLength``/``maxLength``) admits raw control characters (its character
class is replaced in the generated EBNF, see `_json_ebnf`; such strings take no escapes, so no quote,
backslash or newline), and strings admit encoded surrogates (a UTF-8 guard masks the bytes that may not
follow a lead byte).
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch

from .tool_calls import CALL_MARKERS

END = -1  # automaton state: done
_NEVER = 1 << 30  # `_Context.text_lengths` of a token that is never text
_SEPARATORS = (", ", ": ")
_JAMBA_INDENT = "    "  # the template's indentation of each call in the array


class Constraint(Protocol):
    """What the engine calls at each decode step."""

    def mask_logits(self, logits: torch.Tensor) -> None: ...

    def accept(self, token_id: int) -> None: ...

    def is_terminated(self) -> bool: ...


def _xgr():
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - xgrammar is in the "grammar" extra
        raise ImportError("constrained decoding needs xgrammar: pip install 'jamba-local[grammar]'") from exc
    return xgrammar


# -- tokenizer info, cached per tokenizer ------------------------------------------------------------


@dataclass
class _Context:
    """xgrammar's view of one tokenizer at one mask size."""

    info: Any  # xgrammar.TokenizerInfo with the blanked vocabulary
    compiler: Any  # xgrammar.GrammarCompiler (caches compiled grammars)
    vocab_size: int  # mask size (the model's vocabulary)
    token_count: int  # ids the tokenizer really has; ids past it are never allowed
    default_stop_ids: tuple[int, ...]
    never_text: frozenset[int]  # blanked tokens (and ones holding invalid UTF-8): masked in grammar steps
    last_byte: list[int]  # per token: its last byte, -1 when empty
    utf8_bans: dict[int, frozenset[int]]  # lead byte -> tokens whose first byte may not follow it
    lock: threading.Lock = field(default_factory=threading.Lock)
    _ban_tensors: dict = field(default_factory=dict)
    _closing: dict = field(default_factory=dict)
    _lengths: Any = None  # the text tables (`_text_tables`)
    _by_length: Any = None
    _by_text: Any = None
    texts: Any = None  # info.decoded_vocab (bytes per token), once `_text_tables` has run
    _risky: Any = None
    _risky_sets: Any = None

    def closing_ids(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Tokens that only close JSON, in the tiers a budget running out prefers (see
        `GrammarConstraint.remaining_tokens`): those opening with a quote (``"``, ``"}``, ...: inside a
        string they end it; not `` "``); those of braces and brackets only (``}``, ``\n]``, ...: they end an object
        or array, and are plain text inside a string, so they come second); those holding a comma (``,``,
        ``"},``: they end a number or literal where the object still needs a required key, which a brace
        may not close yet, but they also open another call or array item, so they come last); and, apart,
        whitespace alone (``\n``: where the vocabulary has no ``\n]``, the way to an array's end)."""
        if device not in self._closing:
            self._text_tables()  # reads the vocabulary's texts once (decoded_vocab is rebuilt per read)
            tiers: tuple[list[int], ...] = ([], [], [], [])
            for i, raw in enumerate(self.texts[: self.token_count]):
                body = raw.strip()
                if i in self.never_text or (body and body.strip(b'"}],')) or (body[:1] == b'"' and raw[:1] != b'"'):
                    continue  # (`` "``: it opens a string, or ends one with a space written first)
                if body:
                    tiers[2 if b"," in body else 0 if body.startswith(b'"') else 1].append(i)
                elif raw:
                    tiers[3].append(i)
            self._closing[device] = tuple(torch.tensor(t, dtype=torch.long, device=device) for t in tiers)
        return self._closing[device]

    def _text_tables(self) -> None:
        """Text tokens (not blanked, not empty) by byte length, their lengths, and text -> id; built once."""
        if self._by_text is None:
            texts = self.info.decoded_vocab
            ids = [i for i, raw in enumerate(texts[: self.token_count]) if raw and i not in self.never_text]
            ids.sort(key=lambda i: len(texts[i]))
            self._lengths = torch.full((self.vocab_size,), _NEVER, dtype=torch.long)
            self._lengths[ids] = torch.tensor([len(texts[i]) for i in ids], dtype=torch.long)
            self._by_length = torch.tensor(ids, dtype=torch.long)
            self.texts = texts
            # tokens after which closing may need more than before (`GrammarConstraint._guard`): outside a
            # string, those opening one, an object, an array or another item; inside, those with a quote or a
            # backslash, or ending inside a character's UTF-8 bytes
            outside = [i for i in ids if re.search(rb'["{\[,]', texts[i])]
            inside = [i for i in ids if re.search(rb'["\\]', texts[i]) or _ends_inside_a_character(texts[i])]
            self._risky = (torch.tensor(outside, dtype=torch.long), torch.tensor(inside, dtype=torch.long))
            self._risky_sets = (frozenset(outside), frozenset(inside))
            self._by_text = {texts[i]: i for i in ids}  # last: the tables are ready once it is set

    def text_lengths(self) -> torch.Tensor:
        """(vocab_size,) long: each token's text in bytes; `_NEVER` for tokens that are never text (blanked,
        empty, past the tokenizer's ids)."""
        self._text_tables()
        return self._lengths

    def risky_ids(self, in_string: bool) -> torch.Tensor:
        """Token ids that may raise what closing needs (see `_text_tables`), outside or inside a string."""
        self._text_tables()
        return self._risky[1 if in_string else 0]

    def is_risky(self, token: int, in_string: bool) -> bool:
        """Whether ``token`` is one of `risky_ids`."""
        self._text_tables()
        return token in self._risky_sets[1 if in_string else 0]

    def forced_token(self, forced: str, mask: torch.Tensor) -> int | None:
        """The longest token allowed by ``mask`` (an xgrammar bitmask, (1, ceil(vocab_size / 32)) int32)
        whose text starts ``forced`` (the text the grammar admits alone from here: xgrammar's jump-forward
        string), or None."""
        self._text_tables()
        raw = forced.encode()
        for n in range(min(len(raw), 64), 0, -1):
            i = self._by_text.get(raw[:n])
            if i is not None and _bits(mask, torch.tensor([i]))[0]:
                return i
        return None

    def shortest_allowed(self, mask: torch.Tensor, count: int, chunk: int = 4096) -> torch.Tensor:
        """Up to ``count`` text tokens allowed by ``mask``, fewest bytes first."""
        self._text_tables()
        found = []
        for start in range(0, len(self._by_length), chunk):
            ids = self._by_length[start: start + chunk]
            found.append(ids[_bits(mask, ids)])
            if sum(len(f) for f in found) >= count:
                break
        return torch.cat(found)[:count] if found else self._by_length[:0]

    def utf8_ban_tensor(self, lead: int, device: torch.device) -> torch.Tensor:
        key = (lead, device)
        if key not in self._ban_tensors:
            self._ban_tensors[key] = torch.tensor(sorted(self.utf8_bans[lead]), dtype=torch.long, device=device)
        return self._ban_tensors[key]


# The second byte of a UTF-8 sequence after these lead bytes has a narrower range than 0x80-0xBF (no
# overlong forms, no surrogates, nothing past U+10FFFF). xgrammar 0.2.9 lets encoded surrogates (ED A0..BF)
# through in JSON strings, and overlong forms through in regex patterns, so a guard checks the pair.
_UTF8_SECOND_BYTE_BANS = {0xE0: (0x80, 0x9F), 0xED: (0xA0, 0xBF), 0xF0: (0x80, 0x8F), 0xF4: (0x90, 0xBF)}
_INVALID_UTF8 = re.compile(rb"\xe0[\x80-\x9f]|\xed[\xa0-\xbf]|\xf0[\x80-\x8f]|\xf4[\x90-\xbf]|[\xc0\xc1\xf5-\xff]")


def _utf8_tables(decoded_vocab: list[bytes]) -> tuple[set[int], list[int], dict[int, frozenset[int]]]:
    """(tokens holding an invalid byte pair, each token's last byte, lead byte -> tokens banned after it)."""
    invalid, last, bans = set(), [], {lead: set() for lead in _UTF8_SECOND_BYTE_BANS}
    for token_id, raw in enumerate(decoded_vocab):
        last.append(raw[-1] if raw else -1)
        if not raw:
            continue
        if _INVALID_UTF8.search(raw):
            invalid.add(token_id)
        for lead, (low, high) in _UTF8_SECOND_BYTE_BANS.items():
            if low <= raw[0] <= high:
                bans[lead].add(token_id)
    return invalid, last, {lead: frozenset(ids) for lead, ids in bans.items()}


_contexts: dict[tuple[int, int], tuple[weakref.ref, _Context]] = {}
_contexts_lock = threading.Lock()


# Control and marker tokens by name, for vocabularies that hold them as ordinary pieces.
_MARKUP_TOKEN = re.compile(r"<\|[^<>|]*\|>|</?(tool_calls?|citations|documents|tool_definitions|active_output_modes)>")


def _blanked_ids(tokenizer) -> set[int]:
    """Special tokens, markup-like added tokens (``<...>``) and Jamba's control/marker tokens: never text
    inside a grammar."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = getattr(added, "content", str(added))
        if getattr(added, "special", False) or (content.startswith("<") and content.endswith(">")):
            ids.add(int(token_id))
    ids.update(i for token, i in tokenizer.get_vocab().items() if _MARKUP_TOKEN.fullmatch(token))
    return ids


def _default_stop_ids(tokenizer) -> tuple[int, ...]:
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    eom = tokenizer.get_vocab().get("<|eom|>")
    if eom is not None and eom not in ids:
        ids.append(int(eom))
    return tuple(ids)


def _context(tokenizer, vocab_size: int | None) -> _Context:
    xgr = _xgr()
    token_count = len(tokenizer)
    size = int(vocab_size or token_count)
    key = (id(tokenizer), size)
    with _contexts_lock:
        hit = _contexts.get(key)
        if hit is not None and hit[0]() is tokenizer:
            return hit[1]
    stop_ids = _default_stop_ids(tokenizer)
    # from_huggingface detects the vocabulary's encoding (byte-level, byte-fallback, raw); the vocabulary
    # itself is then rebuilt with the special tokens blanked, which xgrammar treats as never-text.
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size, stop_token_ids=list(stop_ids) or None)
    encoded = [""] * size
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < size:
            encoded[token_id] = token
    blanked = frozenset(i for i in _blanked_ids(tokenizer) if i < size)
    for token_id in blanked:
        encoded[token_id] = ""
    info = xgr.TokenizerInfo.from_vocab_and_metadata(encoded, detected.dump_metadata())
    compiler = xgr.GrammarCompiler(info, max_threads=max(1, min(8, os.cpu_count() or 1)))
    invalid, last_byte, utf8_bans = _utf8_tables(info.decoded_vocab)
    ctx = _Context(info, compiler, size, min(token_count, size), stop_ids, blanked | invalid, last_byte, utf8_bans)
    with _contexts_lock:
        _contexts[key] = (weakref.ref(tokenizer), ctx)
    return ctx


def _single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer encodes it as exactly one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


# -- the automaton -----------------------------------------------------------------------------------


@dataclass
class _TokenStep:
    """Exactly one of the keys of ``next`` (token id -> next step index, or END)."""

    next: dict[int, int]


@dataclass
class _GrammarStep:
    """Text matching ``grammar``, then one of the keys of ``next`` once the grammar is complete."""

    grammar: Any  # xgrammar.CompiledGrammar
    next: dict[int, int]


def _scan_string(state: tuple[bool, bool], raw: bytes) -> tuple[bool, bool]:
    """(inside a JSON string, after its backslash) once ``raw`` follows a text in ``state``."""
    inside, escaped = state
    for b in raw:
        if escaped:
            escaped = False
        elif inside and b == 0x5C:  # backslash
            escaped = True
        elif b == 0x22:  # quote
            inside = not inside
    return inside, escaped


def _ends_inside_a_character(raw: bytes) -> bool:
    """Whether ``raw`` ends with the lead of a UTF-8 character whose continuation bytes are still to come."""
    i = len(raw) - 1
    while i >= 0 and 0x80 <= raw[i] < 0xC0 and len(raw) - i <= 3:
        i -= 1
    if i < 0 or raw[i] < 0xC0:
        return False
    return len(raw) - i < (2 if raw[i] < 0xE0 else 3 if raw[i] < 0xF0 else 4)


def _plain_string_text(raw: bytes) -> bool:
    """Text that, inside a JSON string, leaves the structure after the string as it was (no quote, no
    backslash): the closing plan is kept across it."""
    return not re.search(rb'["\\]', raw)


def _bits(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(len(ids),) bool: whether an xgrammar bitmask ((1, words) int32, CPU) allows each of ``ids``
    (CPU). In numpy: the closing walks make tens of thousands of these small lookups, where torch's
    per-op overhead was a third of their time."""
    words, i = mask.numpy()[0], ids.numpy()
    return torch.from_numpy(((words[i >> 5] >> (i & 31)) & 1).astype(bool))


def _allowed(logits: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether any of ``ids`` has a finite logit."""
    return bool(torch.isfinite(logits.index_select(-1, ids[ids < logits.shape[-1]])).any())


def _keep_only(logits: torch.Tensor, ids: torch.Tensor) -> bool:
    """Mask every logit but those of ``ids``, in place, when one of them is finite; report whether one was."""
    ids = ids[ids < logits.shape[-1]]
    kept = logits.index_select(-1, ids)
    if not torch.isfinite(kept).any():
        return False
    logits.fill_(float("-inf"))
    logits.index_copy_(-1, ids, kept)
    return True


class GrammarConstraint:
    """A token-mask constraint: a sequence of forced-token and xgrammar steps (see the module docstring).

    Built by `tool_choice_constraint` and `response_format_constraint`; one instance per generation.

    Budget: the engine sets ``remaining_tokens`` before each step. Within the last ``last_item_window``
    tokens no comma or call marker opens another call, array item or key where the structure could
    close instead (a call's fixed text alone is a dozen tokens), and each step plans how the output
    would end from there (`_closing_need`: a walk on the matcher to the exit, rolled back, redone only
    when the text written leaves the plan). Once the tokens left are no more than that plan plus
    ``closing_margin`` (the closing window), only the plan's kind of token is allowed (`_closing_choice`:
    the forced text of keys and separators, then closers), so a call or JSON answer completes within
    ``max_new_tokens`` instead of being cut off mid-string, and a value that fits is left whole (a fixed
    window of 24 tokens emptied ``{"city": ""}`` at ``max_new_tokens=40``). Within ``guard_window`` tokens
    of the plan, tokens that could raise it past the tokens left (an optional key, an escape, ...) are
    masked (`_guard`). Earlier steps are untouched. Where the budget is at most ``sizing_budget``, the
    window is widened to the structure's shortest form (walked once, on entering it) plus
    ``last_item_window``, so a long structure is planned from far enough back.
    """

    stop_strings_apply = False  # the engine's stop strings end free text, not a call or JSON answer (its
    # fixed text holds newlines: stop=["\n"] cut '<tool_calls>[' after four tokens)
    closing_margin = 1
    guard_window = 8
    last_item_window = 64
    sizing_budget = 2048
    check_count = 8
    branch_count = 4

    def __init__(self, ctx: _Context, steps: list[_TokenStep | _GrammarStep], stop_ids: Iterable[int]):
        self.remaining_tokens: int | None = None
        self._ctx = ctx
        self._steps = steps
        self._stop_ids = sorted(set(int(i) for i in stop_ids))
        self._bitmask = _xgr().allocate_token_bitmask(1, ctx.vocab_size)
        self._lookahead = _xgr().allocate_token_bitmask(1, ctx.vocab_size)  # for `_prefer_closing`, `_closing_need`
        self._probe = _xgr().allocate_token_bitmask(1, ctx.vocab_size)  # `_closing_choice`'s one token of lookahead
        self._ids_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._grammar_needs: dict[int, int] = {}  # `_walk_grammar_steps`
        self._window = self.last_item_window  # widened for a long structure (`mask_logits`)
        self._sized: set[int] = set()
        self._matcher = None
        self._enter(0)

    def _enter(self, index: int) -> None:
        self._at = index
        self._lead = -1  # the last byte of the text so far when it opens a UTF-8 sequence (see the guard)
        self._plan: tuple[int, list[int]] | None = None  # `_closing_need`'s (need, walk), kept while it holds
        self._written: list[int] = []  # this grammar step's tokens, and how far `_string_state` has read them
        self._string = (0, (False, False))
        self._matcher = None
        if index != END and isinstance(self._steps[index], _GrammarStep):
            step = self._steps[index]
            self._matcher = _xgr().GrammarMatcher(step.grammar, override_stop_tokens=sorted(step.next))

    def _ids(self, index: int, device: torch.device) -> torch.Tensor:
        """Token step: the allowed ids; grammar step: the blanked ids that are not its exits."""
        key = (index, device)
        if key not in self._ids_cache:
            if index == END:  # once done only a stop token is allowed, should the engine ask again
                ids = self._stop_ids
            elif isinstance(self._steps[index], _TokenStep):
                ids = sorted(self._steps[index].next)
            else:
                ids = sorted(self._ctx.never_text - set(self._steps[index].next))
            self._ids_cache[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._ids_cache[key]

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of every token not allowed next to -inf, in place. ``logits``: (vocab,)."""
        if self._matcher is None:  # a forced-token step (or done)
            ids = self._ids(self._at, logits.device)
            if self._at != END and self.remaining_tokens is not None and self.remaining_tokens <= self._window:
                # no new call opens near the budget's end where the output can end instead, and no
                # optional token (the space before "<tool_calls>") is taken where the call would not fit
                self._walk_grammar_steps()
                nexts = self._steps[self._at].next.items()
                ending = ([i for i, to in nexts if self._tail(to) < self.remaining_tokens]
                          or [i for i, to in nexts if self._tail(to, through_grammar=True) < self.remaining_tokens])
                if ending:
                    ids = torch.tensor(sorted(ending), dtype=torch.long, device=logits.device)
            ids = ids[ids < logits.shape[-1]]
            kept = logits.index_select(-1, ids)
            logits.fill_(float("-inf"))
            logits.index_copy_(-1, ids, kept)
            return
        xgr = _xgr()
        self._matcher.fill_next_token_bitmask(self._bitmask)
        n = min(logits.shape[-1], self._ctx.vocab_size)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits.view(1, -1), bitmask, vocab_size=n)
        # xgrammar takes a blanked (empty) token that is a stop token of its vocabulary for empty text,
        # allowed anywhere, once a matcher's own stop tokens replace those: mask them here.
        ids = self._ids(self._at, logits.device)
        logits.index_fill_(-1, ids[ids < logits.shape[-1]], float("-inf"))
        if self._lead in self._ctx.utf8_bans:
            ids = self._ctx.utf8_ban_tensor(self._lead, logits.device)
            logits.index_fill_(-1, ids[ids < logits.shape[-1]], float("-inf"))
        if logits.shape[-1] > self._ctx.token_count:
            logits[..., self._ctx.token_count:] = float("-inf")
        if (self.remaining_tokens is not None and not self._written and self._at not in self._sized
                and self.remaining_tokens <= self.sizing_budget):
            # a structure whose shortest form is long needs the window from further back: planning only in
            # the last 64 tokens, a 251-token object at a budget 60 over its minimum was cut 10 times in 10
            self._sized.add(self._at)
            shortest = self._grammar_needs.get(self._at, 1 << 20)  # walked already from the token step before
            if shortest > self._window:
                shortest = self._closing_need(self.remaining_tokens + 1, branch=True)[0]
            self._window = max(self._window, shortest + self.last_item_window)
        if self.remaining_tokens is not None and self.remaining_tokens <= self._window:
            need = self._planned_need(self.remaining_tokens)
            strict = self.remaining_tokens <= need + self.closing_margin
            if not strict and self.remaining_tokens <= need + self.guard_window:
                self._guard(logits)
            self._prefer_closing(logits, strict=strict)
            self._check_likeliest(logits, need, strict)

    def _check_likeliest(self, logits: torch.Tensor, need: int, strict: bool) -> None:
        """Where the plan runs (the budget's last ``last_item_window`` tokens, or more for a long
        structure: ``_window``), mask the model's likeliest tokens while a walk shows
        that closing would no longer fit after them (up to ``check_count`` of them), so that the token a
        greedy decoder takes leaves room to close. `_guard` and `_closing_choice` handle the tokens that
        open more structure; this covers choices with no forced text between them, which may come long
        before the end: a longer tool name, an optional key, an enum value. The plan's own token, and text
        inside a string that keeps the plan (`accept`), are judged by the plan's ``need`` without a walk,
        as are, further than ``guard_window`` from the plan, tokens that open nothing (not
        `_Context.risky_ids`) and commit to no forced text (a digit, string text: xgrammar's jump-forward
        string after them is empty).
        Where ``check_count`` tokens fail, only the plan's next token is kept (the rest are unchecked);
        where every allowed token fails, the plan's next token too; where the plan itself does not fit,
        tokens are held to the plan's own need."""
        # where not even the plan fits (need counts this token; the walk may take a token more than the
        # best tokenization), a token must at least not need more than the plan's own
        room = max(self.remaining_tokens - 1 - (0 if strict else self.closing_margin), need - 1)
        exits = set(self._steps[self._at].next)
        planned = self._plan[1][0] if self._plan is not None and self._plan[1] else None
        string = self._string_state()
        near = self.remaining_tokens <= need + self.guard_window
        masked = []
        for _ in range(self.check_count):
            t = int(torch.argmax(logits))
            if not torch.isfinite(logits[t]) or t == planned or t in exits:
                break
            if self._matcher.accept_token(t):
                if planned is not None and string == (True, False) and _plain_string_text(self._ctx.texts[t]):
                    self._matcher.fill_next_token_bitmask(self._probe)
                    keeps_plan = bool(_bits(self._probe, torch.tensor([planned]))[0])
                else:
                    keeps_plan = False
                if keeps_plan:  # string text after which the plan holds (`accept`, `_planned_need`)
                    after = need
                elif (not near and not self._ctx.is_risky(t, string[0] and not string[1])
                      and not self._matcher.find_jump_forward_string()):
                    after = need  # far from the end, a token that opens nothing and commits to no forced text
                else:
                    after, _ = self._closing_need(room + 1, _scan_string(string, self._ctx.texts[t]))
                self._matcher.rollback(1)
                if after <= room:
                    break
            masked.append((t, float(logits[t])))
            logits[t] = float("-inf")
        else:  # ``check_count`` tokens failed: the rest is unchecked, so keep the plan's token where it is allowed
            if planned is not None and torch.isfinite(logits[planned]):
                _keep_only(logits, torch.tensor([planned], device=logits.device))
        if masked and not torch.isfinite(logits).any():
            keep = planned if planned is not None else masked[0][0]
            logits[keep] = dict(masked).get(keep, 0.0)

    def _guard(self, logits: torch.Tensor) -> None:
        """Near the closing window, mask the tokens that may raise what closing needs
        (`_Context.risky_ids`: opening a key, string, object, array or item, an escape, a character's
        first bytes), but the plan's own next token, what `_closing_choice` keeps, and those of the
        model's four likeliest after which closing still fits in the tokens left (each checked by a walk);
        where that leaves nothing, leave the mask."""
        string = self._string_state()
        risky = self._ctx.risky_ids(string[0] and not string[1])
        risky = risky[risky < logits.shape[-1]]
        risky = risky[torch.isfinite(logits.index_select(-1, risky.to(logits.device))).cpu()]
        if not len(risky):
            return
        spared = [self._plan[1][0]] if self._plan is not None and self._plan[1] else []
        keep = self._closing_choice(self._bitmask, string)
        spared += keep.tolist() if keep is not None else []
        likeliest = risky[torch.argsort(logits.index_select(-1, risky.to(logits.device)).cpu(), descending=True)][:4]
        for t in likeliest.tolist():
            if t not in spared and self._matcher.accept_token(t):
                need, _ = self._closing_need(self.remaining_tokens, _scan_string(string, self._ctx.texts[t]))
                self._matcher.rollback(1)
                if need < self.remaining_tokens - 1:
                    spared.append(t)
        risky = risky[~torch.isin(risky, torch.tensor(spared, dtype=torch.long))].to(logits.device)
        saved = logits.index_select(-1, risky)
        logits.index_fill_(-1, risky, float("-inf"))
        if not torch.isfinite(logits).any():
            logits.index_copy_(-1, risky, saved)

    def _walk_grammar_steps(self) -> None:
        """Once, from a token step: each grammar step's `_closing_need` from its start (the shortest
        output the walk finds, with its exit and what follows), for `_tail`."""
        if self._grammar_needs or self._matcher is not None:
            return
        at = self._at
        for index, step in enumerate(self._steps):
            if isinstance(step, _GrammarStep):
                self._enter(index)
                self._grammar_needs[index] = self._closing_need(self._window + 1, branch=True)[0]
        self._enter(at)

    def _tail(self, index: int, seen: frozenset = frozenset(), through_grammar: bool = False) -> int:
        """Tokens from step ``index`` to the end along the shortest path: forced tokens through token
        steps, and with ``through_grammar`` a grammar step's walked length (`_walk_grammar_steps`);
        END: 0; no such path: 2**20."""
        if index == END:
            return 0
        step = self._steps[index]
        if isinstance(step, _GrammarStep):
            return self._grammar_needs.get(index, 1 << 20) if through_grammar else 1 << 20
        if index in seen:
            return 1 << 20
        return 1 + min(self._tail(i, seen | {index}, through_grammar) for i in step.next.values())

    def _string_state(self) -> tuple[bool, bool]:
        """(inside a JSON string, after its backslash) at the end of this grammar step's text so far (its
        text is JSON and the fixed text around it, which holds no quote)."""
        read, state = self._string
        self._ctx.text_lengths()
        for token in self._written[read:]:
            state = _scan_string(state, self._ctx.texts[token])
        self._string = (len(self._written), state)
        return state

    def _planned_need(self, limit: int) -> int:
        """`_closing_need`, walked again only where the last walk no longer holds. `accept` keeps the walk
        across its own next token (one shorter) and across text inside a string without a quote or a
        backslash (the structure after the string is as it was), and drops it otherwise; here it is also
        dropped when its next token is no longer allowed (this step's mask is in ``self._bitmask``: a
        string at its maximum length, a character's bytes still to come)."""
        if self._plan is not None and self._plan[1] and _bits(self._bitmask, torch.tensor(self._plan[1][:1]))[0]:
            return min(limit, self._plan[0])
        need, walk = self._closing_need(limit, branch=True)
        self._plan = (need, walk)
        return need

    def _closing_need(self, limit: int, string: tuple[bool, bool] | None = None,
                      branch: bool = False) -> tuple[int, list[int]]:
        """(tokens that ending the output takes from here: the rest of this grammar step, its exit token
        and the forced tokens after it, at most ``limit``; the walk's tokens). The walk on the matcher
        (rolled back after) takes one of the tokens the closing window keeps (`_closing_choice`) at each
        step, so it is what the window writes; where that leaves a choice (or the model free), the first
        of the shortest tokens, or with ``branch`` the one whose own walk is shortest (`_shortest_branch`:
        a shorter tool name, a required key rather than an optional one)."""
        ctx, step = self._ctx, self._steps[self._at]
        exits = torch.tensor(sorted(step.next), dtype=torch.long)
        exits = exits[exits < ctx.vocab_size]
        walk, string = [], self._string_state() if string is None else string
        quote, brace, _, _ = ctx.closing_ids(torch.device("cpu"))
        closers = torch.cat([quote, brace])
        try:
            while len(walk) < limit:
                self._matcher.fill_next_token_bitmask(self._lookahead)
                if _bits(self._lookahead, exits).any():
                    return min(limit, len(walk) + 1 + min(self._tail(i) for i in step.next.values())), walk
                keep = self._closing_choice(self._lookahead, string)
                if keep is None:
                    keep = ctx.shortest_allowed(self._lookahead, 16 if branch else 1)
                elif (branch and not bool(torch.isin(keep, closers).all())  # a closer ends it: no choice
                      and not self._matcher.find_jump_forward_string()):  # a choice: `_closing_choice` may
                    # keep one branch's token only (``opt`` closes its key string soonest)
                    more = ctx.shortest_allowed(self._lookahead, 16)
                    keep = torch.cat([keep, more[~torch.isin(more, keep)]])
                if branch and len(keep) > 1:  # (compared past the limit too: where neither fits, the shorter)
                    keep = self._shortest_branch(keep, string, limit - len(walk) + self.branch_count * 4)
                if not len(keep) or not self._matcher.accept_token(int(keep[0])):
                    return limit, walk
                walk.append(int(keep[0]))
                string = _scan_string(string, ctx.texts[walk[-1]])
            return limit, walk
        finally:
            if walk:
                self._matcher.rollback(len(walk))

    def _shortest_branch(self, tokens: torch.Tensor, string: tuple[bool, bool], limit: int) -> torch.Tensor:
        """Of ``tokens`` (allowed here), the one after which closing takes fewest tokens (one-element
        tensor). Where some token commits to forced text (xgrammar's jump-forward string after it: the
        rest of a key or tool name, the separator after `` ""``), the first token and one token per
        committed branch (its text and that forced text: ``o`` and ``opt`` are one branch, at most
        ``branch_count``) are walked; where none commits (digits, string content), the first."""
        branches: dict[bytes, int] = {}  # committed ones (their text and forced text) -> a token
        for t in tokens.tolist():
            if self._matcher.accept_token(t):
                lead = self._matcher.find_jump_forward_string().encode()
                self._matcher.rollback(1)
                if lead:
                    branches.setdefault(self._ctx.texts[t] + lead, t)
        if not branches:
            return tokens[:1]
        best, best_need = int(tokens[0]), limit + 1
        first = [] if int(tokens[0]) in branches.values() else [int(tokens[0])]  # the uncommitted way, once
        for t in first + list(branches.values())[:self.branch_count]:
            if self._matcher.accept_token(t):
                need, _ = self._closing_need(best_need - 1, _scan_string(string, self._ctx.texts[t]))
                self._matcher.rollback(1)
                if need + 1 < best_need:
                    best, best_need = t, need + 1
        return torch.tensor([best])

    def _closing_choice(self, mask: torch.Tensor, string: tuple[bool, bool]) -> torch.Tensor | None:
        """The tokens the closing window keeps (ids, CPU) where the grammar's ``mask`` (an xgrammar
        bitmask) allows no exit, or None to leave the model's choice. In order: the longest token of the
        text the grammar admits alone from here (`_Context.forced_token`: a key, a separator) where it is
        not all of that text; inside a string, the longest quote-first closer; the longest brace/bracket
        closer (`_Context.closing_ids`); those of the 16 shortest allowed tokens after which an exit or one of
        those closers is allowed (whitespace before ``]``, a number's first digit, ``" 3"`` after ``":"``);
        the token of all the forced text (or those of the comma lookahead below that hold all of it and
        more: `` 0`` where the separator's space is forced; these also join the closers above, for
        `_shortest_branch` to weigh); the longest comma closer (a value ends where a required key
        follows); those of the 16 shortest after which a comma is allowed. ``string``: `_string_state`'s
        at this point (a quote closes only inside a string)."""
        ctx = self._ctx
        quote, brace, comma, _ = ctx.closing_ids(torch.device("cpu"))
        lengths = ctx.text_lengths()
        jump = self._matcher.find_jump_forward_string()
        forced = ctx.forced_token(jump, mask)
        if forced is not None and lengths[forced] < len(jump.encode()):
            return torch.tensor([forced])
        for tier in (quote, brace) if string[0] and not string[1] else (brace,):  # outside, a quote opens a string
            tier = tier[_bits(mask, tier)]
            if len(tier):
                return tier[lengths[tier].argmax()].view(1)
        commas = comma[_bits(mask, comma)]
        short = ctx.shortest_allowed(mask, 16)
        short = short[~torch.isin(short, comma)].tolist()
        exits = torch.tensor(sorted(self._steps[self._at].next), dtype=torch.long)
        exits = exits[exits < ctx.vocab_size]
        to_close, to_comma = [], []
        for i in short:  # one token of lookahead each
            if self._matcher.accept_token(i):
                self._matcher.fill_next_token_bitmask(self._probe)
                self._matcher.rollback(1)
                after = _scan_string(string, ctx.texts[i])
                closing = torch.cat([exits, quote, brace]) if after[0] and not after[1] else torch.cat([exits, brace])
                if _bits(self._probe, closing).any():
                    to_close.append(i)
                elif _bits(self._probe, comma).any():
                    to_comma.append(i)
        # tokens of the comma lookahead that hold all the forced text and more: ' 0' or ' ""' where ': ' or
        # ': "' is forced and a comma must follow (one token where the forced text and a closer take two or three)
        covering = ([i for i in to_comma if len(ctx.texts[i]) > len(jump.encode()) and ctx.texts[i].startswith(jump.encode())]
                    if forced is not None else [])
        if to_close:
            return torch.tensor(to_close + covering)
        if forced is not None:  # the whole forced text, where no token of it and more leads to a closer
            return torch.tensor(covering or [forced])
        if len(commas):
            return commas[lengths[commas].argmax()].view(1)
        return torch.tensor(to_comma) if to_comma else None

    def _prefer_closing(self, logits: torch.Tensor, strict: bool) -> None:
        """``strict`` (the closing window): keep only the step's exits when allowed, else what
        `_closing_choice` keeps. Not strict (the wider window): where the step's exits are allowed, keep
        only them (a separator would open another call); outside a string (no quote allowed), mask the
        comma tokens when a brace/bracket closer, or a whitespace token leading to one, is allowed: no new
        call or item opens."""
        exits = torch.tensor(sorted(self._steps[self._at].next), dtype=torch.long, device=logits.device)
        if _keep_only(logits, exits):  # the output may end here: no separator opens another call
            return
        quote, brace, comma, space = self._ctx.closing_ids(logits.device)
        if strict:  # self._bitmask: this step's grammar mask (the guards' bans are in the logits only)
            keep = self._closing_choice(self._bitmask, self._string_state())
            if keep is not None:
                _keep_only(logits, keep.to(logits.device))
            return
        if _allowed(logits, quote) or not _allowed(logits, comma):
            return
        if _allowed(logits, exits) or _allowed(logits, brace):
            logits.index_fill_(-1, comma[comma < logits.shape[-1]], float("-inf"))
            return
        closers = torch.cat([exits, quote, brace]).cpu()
        space = space[space < logits.shape[-1]]
        for w in space[torch.isfinite(logits.index_select(-1, space))].tolist():
            if not self._matcher.accept_token(w):
                continue
            self._matcher.fill_next_token_bitmask(self._lookahead)
            self._matcher.rollback(1)
            if _bits(self._lookahead, closers).any():
                logits.index_fill_(-1, comma[comma < logits.shape[-1]], float("-inf"))
                return

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id``. Raises ValueError when the token was not allowed."""
        token_id = int(token_id)
        if self._at == END:
            raise ValueError(f"token {token_id} after the constrained output ended")
        step = self._steps[self._at]
        if self._matcher is None:
            if token_id not in step.next:
                raise ValueError(f"token {token_id} not allowed here (expected one of {sorted(step.next)})")
            self._enter(step.next[token_id])
            return
        ctx = self._ctx
        if ((token_id in ctx.never_text and token_id not in step.next)
                or token_id in ctx.utf8_bans.get(self._lead, ())
                or not self._matcher.accept_token(token_id)):
            raise ValueError(f"token {token_id} does not match the grammar here")
        if self._matcher.is_terminated():
            self._enter(step.next[token_id])
            return
        if token_id < len(ctx.last_byte):
            self._lead = ctx.last_byte[token_id]
        if self._plan is not None:  # kept across its own next token, or text inside a string (`_planned_need`)
            if self._plan[1] and self._plan[1][0] == token_id:
                self._plan = (self._plan[0] - 1, self._plan[1][1:])
            elif self._string_state() != (True, False) or not _plain_string_text(ctx.texts[token_id]):
                self._plan = None
        self._written.append(token_id)

    def is_terminated(self) -> bool:
        """True once the constrained output (and its end token) is complete."""
        return self._at == END


class BannedTokensConstraint:
    """``tool_choice="none"``: the given token ids (the call markers) are never allowed; text is free."""

    def __init__(self, banned_ids: Iterable[int], stop_ids: Iterable[int], token_count: int):
        self._banned = sorted(set(int(i) for i in banned_ids))
        self._stop = set(int(i) for i in stop_ids)
        self._token_count = token_count
        self._done = False
        self._banned_cache: dict[torch.device, torch.Tensor] = {}

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the banned ids (and ids past the tokenizer's vocabulary) to -inf, in place."""
        if logits.device not in self._banned_cache:
            self._banned_cache[logits.device] = torch.tensor(self._banned, dtype=torch.long, device=logits.device)
        ids = self._banned_cache[logits.device]
        logits.index_fill_(-1, ids[ids < logits.shape[-1]], float("-inf"))
        if logits.shape[-1] > self._token_count:
            logits[..., self._token_count:] = float("-inf")

    def accept(self, token_id: int) -> None:
        """Note the token; a stop token ends the output. Raises ValueError for a banned token."""
        if int(token_id) in self._banned:
            raise ValueError(f"token {token_id} is banned (tool_choice='none')")
        if int(token_id) in self._stop:
            self._done = True

    def is_terminated(self) -> bool:
        """True after a stop token."""
        return self._done


class EitherConstraint:
    """Tools with ``tool_choice="auto"`` and a ``response_format`` together (LangChain's agents bind
    both, as OpenAI takes them): the output is either tool calls or the JSON answer. Both constraints
    run side by side while the text so far fits both (a leading space); the mask is the union of those
    still alive, and a token drops those that do not allow it."""

    stop_strings_apply = False

    def __init__(self, *constraints: GrammarConstraint):
        self._alive = list(constraints)

    @property
    def remaining_tokens(self) -> int | None:
        return self._alive[0].remaining_tokens

    @remaining_tokens.setter
    def remaining_tokens(self, value: int | None) -> None:
        for c in self._alive:
            c.remaining_tokens = value

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens that no live constraint allows to -inf, in place. ``logits``: (vocab,)."""
        if len(self._alive) == 1:
            self._alive[0].mask_logits(logits)
            return
        allowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for c in self._alive:
            masked = logits.clone()
            c.mask_logits(masked)
            allowed |= torch.isfinite(masked)
        logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance the constraints that allow ``token_id`` and drop the others. Raises ValueError when
        none does."""
        alive, errors = [], []
        for c in self._alive:
            try:
                c.accept(token_id)
                alive.append(c)
            except ValueError as error:
                errors.append(str(error))
        if not alive:
            raise ValueError(f"token {token_id} allowed by neither tool calls nor the response format: {errors}")
        self._alive = alive

    def is_terminated(self) -> bool:
        """True once a live constraint's output is complete."""
        return any(c.is_terminated() for c in self._alive)


# -- schemas -----------------------------------------------------------------------------------------

# xgrammar 0.2.9 writes the characters of a length-bounded string (minLength/maxLength) as this class,
# which lets raw control characters through (invalid JSON). It is replaced by the class its unbounded
# strings use, less escapes (which xgrammar leaves out of bounded strings too): a single character class
# keeps xgrammar's fast path for bounded repetition, where an alternation with escapes made each step's
# mask cost grow with the string's length (seconds per token at 65536 tokens).
_BOUNDED_STRING_CHARS = '(([^\\"\\\\\\r\\n]))'
_JSON_STRING_CHARS = '(([^\\0-\\x1f\\"\\\\]))'


@functools.lru_cache(maxsize=256)
def _json_ebnf(schema_json: str) -> str:
    """EBNF (xgrammar's) of compact JSON matching the schema, with the template's separators."""
    ebnf = str(_xgr().Grammar.from_json_schema(json.loads(schema_json), any_whitespace=False, separators=_SEPARATORS))
    return ebnf.replace(_BOUNDED_STRING_CHARS, _JSON_STRING_CHARS)


def _schema_key(schema: Any) -> str:
    return json.dumps(schema, ensure_ascii=False)  # key order kept: it is the order properties are generated in


def normalize_tools(tools: Iterable[dict]) -> list[dict]:
    """``[{"name", "parameters"}]`` from OpenAI function tools or bare ``{"name", "parameters"}`` dicts.

    A tool without ``parameters`` takes none (its arguments are ``{}``).
    """
    out = []
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"a tool needs a string 'name' (OpenAI function shape): {tool!r}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        out.append({"name": fn["name"], "parameters": params})
    return out


def _chosen_tools(tools: list[dict], tool_choice) -> tuple[list[dict], bool]:
    """(tools the output may call, whether exactly one call)."""
    if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}} or {"name": ...}
        tool_choice = (tool_choice.get("function") or tool_choice).get("name")
    if tool_choice in ("any", "required"):
        if not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs at least one tool")
        return tools, False
    chosen = [t for t in tools if t["name"] == tool_choice]
    if not chosen:
        raise ValueError(f"tool_choice={tool_choice!r} names no tool; tools: {[t['name'] for t in tools]}")
    return chosen[:1], True


# -- factories ---------------------------------------------------------------------------------------


def _call_tags(tools: list[dict], prefix: str, suffix: str) -> list:
    from xgrammar.structural_tag import GrammarFormat, TagFormat

    return [TagFormat(begin=prefix + '{"name": ' + json.dumps(t["name"], ensure_ascii=False) + ', "arguments": ',
                      content=GrammarFormat(grammar=_json_ebnf(_schema_key(t["parameters"]))),
                      end="}" + suffix)
            for t in tools]


def _compile(ctx: _Context, fmt) -> Any:
    from xgrammar.structural_tag import StructuralTag

    with ctx.lock:
        return ctx.compiler.compile_structural_tag(StructuralTag(format=fmt))


def tool_choice_constraint(tokenizer, tools: Iterable[dict] | None, tool_choice: Any, call_format: str = "jamba",
                           vocab_size: int | None = None,
                           stop_token_ids: Iterable[int] | None = None,
                           parallel_tool_calls: bool = True,
                           ) -> GrammarConstraint | BannedTokensConstraint | None:
    """The constraint for a ``tool_choice``, or None when the output is free.

    Args:
        tokenizer: the checkpoint's (fast) tokenizer.
        tools: OpenAI function tools (``{"type": "function", "function": {"name", "parameters"}}``) or bare
            ``{"name", "parameters"}`` dicts; ``parameters`` is the arguments' JSON schema.
        tool_choice: ``"auto"``/None (free: returns None); ``"none"`` (the call marker token is never
            allowed); ``"any"``/``"required"`` (the output is one or more calls to the tools); a tool name or
            ``{"type": "function", "function": {"name": ...}}`` (exactly one call to that tool).
        call_format: ``"jamba"`` (``<tool_calls>[...]</tool_calls>``) or ``"hermes"``
            (``<tool_call>{...}</tool_call>``).
        vocab_size: the model's vocabulary (mask) size when it differs from ``len(tokenizer)``; ids past the
            tokenizer's are never allowed.
        stop_token_ids: the ids that end generation (EOS, ``<|eom|>``); after the calls only these are
            allowed. Default: the tokenizer's EOS and ``<|eom|>``.
        parallel_tool_calls: with ``"any"``/``"required"``, whether several calls may follow one another
            (False: exactly one call, to any of the tools).

    Raises:
        ValueError: an unknown ``tool_choice``/``call_format``, a tool name not among the tools, no tools
            for ``"any"``, or a schema xgrammar cannot compile.
    """
    if tool_choice in (None, "auto"):
        return None
    if call_format not in CALL_MARKERS:
        raise ValueError(f"call_format must be one of {sorted(CALL_MARKERS)}, got {call_format!r}")
    ctx = _context(tokenizer, vocab_size)
    stops = sorted(set(int(i) for i in (stop_token_ids if stop_token_ids is not None else ctx.default_stop_ids)))
    if not stops:
        raise ValueError("no stop token ids: pass stop_token_ids")
    open_text, close_text = CALL_MARKERS[call_format]
    open_id, close_id = _single_token(tokenizer, open_text), _single_token(tokenizer, close_text)
    if tool_choice == "none":
        return BannedTokensConstraint([i for i in (open_id, close_id) if i is not None], stops, ctx.token_count)
    chosen, single = _chosen_tools(normalize_tools(tools or []), tool_choice)
    single = single or not parallel_tool_calls
    try:
        steps = (_jamba_steps if call_format == "jamba" else _hermes_steps)(
            ctx, tokenizer, chosen, single, open_text, close_text, open_id, close_id, stops)
    except (RuntimeError, ValueError) as exc:  # xgrammar reports unsupported schemas as RuntimeError
        raise ValueError(f"cannot build the tool-call grammar: {exc}") from exc
    return GrammarConstraint(ctx, steps, stops)


def _jamba_steps(ctx, tokenizer, tools, single, open_text, close_text, open_id, close_id, stops):
    from xgrammar.structural_tag import ConstStringFormat, SequenceFormat, TagsWithSeparatorFormat

    calls = TagsWithSeparatorFormat(tags=_call_tags(tools, _JAMBA_INDENT, ""), separator=",\n",
                                    at_least_one=True, stop_after_first=single)
    body = [ConstStringFormat(value="[\n"), calls, ConstStringFormat(value="\n]")]
    done = {i: END for i in stops}
    if open_id is None or close_id is None:  # markers are plain text in this vocabulary
        fmt = SequenceFormat(elements=[ConstStringFormat(value=open_text), *body, ConstStringFormat(value=close_text)])
        return [_GrammarStep(_compile(ctx, fmt), done)]
    # The template writes "<|assistant|> " + content + "<tool_calls>": allow that one space first.
    space_id = _single_token(tokenizer, " ")
    first = {open_id: 2} if space_id is None else {open_id: 2, space_id: 1}
    return [_TokenStep(first), _TokenStep({open_id: 2}),
            _GrammarStep(_compile(ctx, SequenceFormat(elements=body)), {close_id: 3}), _TokenStep(done)]


def _hermes_steps(ctx, tokenizer, tools, single, open_text, close_text, open_id, close_id, stops):
    from xgrammar.structural_tag import ConstStringFormat, OrFormat, SequenceFormat, TagsWithSeparatorFormat

    done = {i: END for i in stops}
    if open_id is None or close_id is None:
        tags = _call_tags(tools, open_text + "\n", "\n" + close_text)
        fmt = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=single)
        return [_GrammarStep(_compile(ctx, fmt), done)]
    tags = _call_tags(tools, "", "")
    call = tags[0] if len(tags) == 1 else OrFormat(elements=tags)
    body = _compile(ctx, SequenceFormat(elements=[ConstStringFormat(value="\n"), call, ConstStringFormat(value="\n")]))
    after = dict(done)
    newline_id = _single_token(tokenizer, "\n")
    if not single:  # another call may follow, as "</tool_call>\n<tool_call>"
        after[open_id] = 1
        if newline_id is not None:
            after[newline_id] = 3
    return [_TokenStep({open_id: 1}), _GrammarStep(body, {close_id: 2}), _TokenStep(after), _TokenStep({open_id: 1})]


def _response_schema(response_format: Any) -> dict | None:
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return response_format.model_json_schema()  # a pydantic model class
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be a dict, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return schema if isinstance(schema, dict) else {"type": "object", "additionalProperties": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return schema
    json_types = {"object", "array", "string", "number", "integer", "boolean", "null"}
    if isinstance(kind, str) and kind not in json_types or isinstance(kind, list) and not set(kind) <= json_types:
        raise ValueError(f"response_format type {kind!r} is neither a response format ('text', 'json_object', "
                         f"'json_schema') nor a JSON schema type ({', '.join(sorted(json_types))})")
    return response_format  # a bare JSON schema


def response_format_constraint(tokenizer, response_format: Any, vocab_size: int | None = None,
                               stop_token_ids: Iterable[int] | None = None) -> GrammarConstraint | None:
    """The constraint for a ``response_format``, or None when the output is free.

    Args:
        tokenizer: the checkpoint's (fast) tokenizer.
        response_format: ``{"type": "json_schema", "json_schema": {"schema": {...}}}``, a bare JSON schema
            dict, a pydantic model class, ``{"type": "json_object"}`` (any JSON object), or
            None / ``{"type": "text"}`` (free).
        vocab_size, stop_token_ids: as in `tool_choice_constraint`.

    The output is compact JSON (``", "``/``": "`` separators), optionally after one space (the template's
    space after ``<|assistant|>``), then one stop token.

    Raises:
        ValueError: a malformed ``response_format`` or a schema xgrammar cannot compile.
    """
    from xgrammar.structural_tag import ConstStringFormat, GrammarFormat, OptionalFormat, SequenceFormat

    schema = _response_schema(response_format)
    if schema is None:
        return None
    ctx = _context(tokenizer, vocab_size)
    stops = sorted(set(int(i) for i in (stop_token_ids if stop_token_ids is not None else ctx.default_stop_ids)))
    if not stops:
        raise ValueError("no stop token ids: pass stop_token_ids")
    try:
        fmt = SequenceFormat(elements=[OptionalFormat(content=ConstStringFormat(value=" ")),
                                       GrammarFormat(grammar=_json_ebnf(_schema_key(schema)))])
        grammar = _compile(ctx, fmt)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot build the JSON grammar: {exc}") from exc
    return GrammarConstraint(ctx, [_GrammarStep(grammar, {i: END for i in stops})], stops)


__all__ = [
    "BannedTokensConstraint",
    "Constraint",
    "GrammarConstraint",
    "normalize_tools",
    "response_format_constraint",
    "tool_choice_constraint",
]
