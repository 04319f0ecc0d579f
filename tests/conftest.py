import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when its modules load, and other packages (xgrammar, bitsandbytes) import
# it before tests/test_triton_kernels.py runs: without a GPU its kernels run in the interpreter, so set it
# for the whole session, first (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from jamba_core.tokenizer import shared_dir as _shared_dir  # noqa: E402 (after TRITON_INTERPRET is set)

SHARED = _shared_dir()  # the library's own lookup: $JAMBA_LOCAL_SHARED when set and not empty, else ../shared


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from jamba_core.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from jamba_core import Engine

    return Engine.from_pretrained(tiny_checkpoint, progress=False)


@pytest.fixture
def scripted_engine(tiny_checkpoint):
    """A factory: a fresh tiny engine whose generation writes ``text`` (in 3-character chunks) whatever the
    prompt, taken for a reasoning model when ``thinks`` (as a chat template writing ``<think>`` makes it), its
    prompt ending inside ``<think>`` when ``opened``. For the adapters' handling of outputs a random model
    never writes."""
    from jamba_core import Engine
    from jamba_core.engine import StreamChunk, Timings, Usage

    def make(text: str, thinks: bool = True, opened: bool = False):
        engine = Engine.from_pretrained(tiny_checkpoint, progress=False)
        engine._thinks = thinks  # `jamba_core.chat.api.thinks` reads the template once and keeps the answer here

        def stream(prompt, **kwargs):
            for i in range(0, len(text), 3):
                yield StreamChunk(text[i:i + 3], [0])
            yield StreamChunk("", [], "stop", Usage(7, len(text)), Timings())

        engine.stream = stream
        if opened:
            render = engine.render
            engine.render = lambda *args, **kwargs: render(*args, **kwargs) + "<think>\n"
        return engine

    return make
