"""Tokenizers: a small trained one for tests and demos, loading a checkpoint's own, and the special ids.

The trained tokenizer has the special tokens of a Jamba 1.5+ tokenizer in the same order (ids 0-3 are pad,
BOS, EOS, unk), adds BOS to plain-text encodes as the real one does, and carries our Jamba chat template,
so everything built on it sees the real checkpoints' format at a size that trains in about a second.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jamba_core.chat.template import JAMBA_CHAT_TEMPLATE

PAD, BOS, EOS, UNK = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"
EOM, BOM = "<|eom|>", "<|bom|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (
    PAD, BOS, EOS, UNK, EOM, BOM, *ROLE_TOKENS,
    "<documents>", "</documents>", "<tool_definitions>", "</tool_definitions>",
    "<active_output_modes>", "</active_output_modes>", "<citations>", "</citations>",
    "<tool_calls>", "</tool_calls>",
)
# Byte-level BPE needs every byte as a base token, plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
_FALLBACK_CHARS = 2_000_000
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

_trained: dict[tuple[int, str, str], str] = {}  # (vocab_size, sha256 of text, spaces) -> tokenizer JSON


def shared_dir() -> Path:
    """The shared data folder: $JAMBA_LOCAL_SHARED, else the `shared` folder beside the project root."""
    env = os.environ.get("JAMBA_LOCAL_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


def _default_text() -> str:
    # Moby-Dick when the shared data is there; otherwise Python's own standard library source, which
    # every machine that runs this has.
    book = shared_dir() / "data" / "moby-dick.txt"
    if book.is_file():
        return book.read_text(encoding="utf-8")
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        part = path.read_text(encoding="utf-8", errors="replace")
        parts.append(part)
        size += len(part)
        if size >= _FALLBACK_CHARS:
            break
    return "".join(parts)


def _train(vocab_size: int, text: str, spaces: str = "attached") -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if spaces == "isolated":  # every space its own piece before the byte-level split: words never carry one
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]
    )
    return tok


def train_tokenizer(vocab_size: int = 8192, text: str | None = None, spaces: str = "attached") -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer in the Jamba layout (cached in-process).

    Args:
        vocab_size: the most tokens it may have; the result is smaller when `text` cannot fill it.
        text: training text; default ../shared/data/moby-dick.txt (or $JAMBA_LOCAL_SHARED/data/...),
            else Python's standard library source.
        spaces: "attached" (GPT-2's byte-level split: a word takes the space before it, so ``" whale"``
            and the ``whale`` of ``"whale"`` are different tokens) or "isolated" (each space is a token of
            its own, so a word has one spelling in prose, after a quote and inside JSON: what a small
            model needs to copy a tool argument it read in the request; prose costs about one token
            more per word).

    Returns:
        A new `PreTrainedTokenizerFast` on every call (safe to mutate): special tokens at ids 0..19 in
        `SPECIAL_TOKENS` order, pad/bos/eos/unk set, BOS prepended by plain-text encodes, our Jamba
        `chat_template`, and an exact `decode(encode(s)) == s` for any unicode text.

    Raises:
        ValueError: `vocab_size` is below `MIN_VOCAB_SIZE` (256 bytes + the special tokens).
    """
    if spaces not in ("attached", "isolated"):
        raise ValueError(f"spaces must be 'attached' or 'isolated', got {spaces!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size}")
    text = _default_text() if text is None else text
    key = (vocab_size, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), spaces)
    if key not in _trained:
        _trained[key] = _train(vocab_size, text, spaces).to_str()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained[key]),
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
        chat_template=JAMBA_CHAT_TEMPLATE,
    )


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Load the tokenizer saved in a checkpoint folder (local files only, no remote code).

    Raises:
        FileNotFoundError: `path` is not a folder, or holds none of tokenizer.json,
            tokenizer_config.json, tokenizer.model.
        ValueError: transformers cannot build a tokenizer from the files there (naming those present,
            and tokenizer.json where it is missing).
    """
    folder = Path(path)
    if not folder.is_dir() or not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in folder {str(folder)!r}")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    # ValueError / OSError: e.g. only tokenizer_config.json (transformers asks for sentencepiece); KeyError,
    # TypeError, AttributeError: a tokenizer.json that is JSON but not a tokenizer ({} lacks "added_tokens")
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as err:
        present = [name for name in _TOKENIZER_FILES if (folder / name).is_file()]
        hint = "" if (folder / "tokenizer.json").is_file() else (
            "; tokenizer.json is missing (every Jamba checkpoint ships it: copy it from the model's repository)")
        raise ValueError(f"could not load the tokenizer in {str(folder)!r} (it holds {', '.join(present)}){hint}: "
                         f"{type(err).__name__}: {' '.join(str(err).split())}") from err


def stop_token_ids(tokenizer, config) -> set[int]:
    """Ids that end generation: every id in `config.eos_token_id` (int, list or None) plus `<|eom|>`.

    `<|eom|>` (end of message) is looked up by name, never by a hard-coded id. When the config gives no
    EOS id, the tokenizer's EOS id is used instead, so that generation can still stop.
    """
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = set() if eos is None else {int(i) for i in ([eos] if isinstance(eos, int) else eos)}
    eom = tokenizer.get_vocab().get(EOM)  # get_vocab, not convert_tokens_to_ids, which answers unk
    if eom is not None:
        ids.add(eom)
    return ids


def control_token_ids(tokenizer) -> set[int]:
    """Ids dropped from output text: pad, BOS, EOS, unk, `<|eom|>`, `<|bom|>` and the role tokens.

    The tool, document and citation markers (`<tool_calls>`, `<citations>`, ...) are not control tokens:
    they stay in the text so that the output parsers see them.
    """
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    vocab = tokenizer.get_vocab()
    ids |= {vocab.get(token) for token in (EOM, BOM, *ROLE_TOKENS)}
    return {i for i in ids if i is not None}
