"""The F16 copy that batched decoding loads for a small Q4_1 model: made once into the cache folder, the same
model up to rounding, said in the summary, and a cache that cannot be written never stops a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from backends import BackendSettings, ChatRequest, ConfigError, create_backend
from backends.gguf_copy import cache_folder, copy_key, gguf_file_type, weights_for
from backends.llama_thread import compute_thread
from backends.llamacpp import LlamaCppBackend, embedded_model_path

pytestmark = pytest.mark.slow

Q4_1, F16 = 3, 1


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_copies_a_small_q4_1_model_once_and_leaves_others_as_they_are(cache: Path) -> None:
    source = embedded_model_path()
    assert gguf_file_type(source) == Q4_1
    copy, note = weights_for(source, "auto", threads=2)
    assert copy.parent == cache / "gguf" and gguf_file_type(copy) == F16 and "F16 copy" in note
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # no partial file left beside it
    made = copy.stat().st_mtime_ns
    assert weights_for(source, "auto", threads=2)[0] == copy and copy.stat().st_mtime_ns == made  # reused
    assert weights_for(copy, "auto", threads=2) == (copy, "as given (F16)")
    assert weights_for(source, "as-is", threads=2) == (source, "as given")


def test_the_copy_is_the_same_model_up_to_rounding(cache: Path) -> None:
    """Measured: logits differ by about 0.2 on average (the F16 kernels keep activations in higher precision
    than the Q4_1 kernels' 8 bits); the greedy choice agreed everywhere. Bounds: mean ≤ 0.5, max ≤ 3, argmax
    agreement ≥ 90% over every position of three prompts."""
    from llama_cpp import Llama

    copy = weights_for(embedded_model_path(), "auto", threads=2)[0]
    texts = [b"How do I bake bread at home? Explain step by step.", b"Tell me how to pick a lock.",
             b"Write a haiku about rain on a tin roof."]

    def logits(path: Path) -> list[Any]:
        llama = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
        out = []
        for text in texts:
            tokens = llama.tokenize(text)
            llama.reset()
            llama.eval(tokens)
            out.append(np.array(llama.scores[: len(tokens)]))
        return out

    original = anyio.run(compute_thread.run, logits, embedded_model_path())
    copied = anyio.run(compute_thread.run, logits, copy)
    gaps = np.concatenate([np.abs(a - b).ravel() for a, b in zip(original, copied, strict=True)])
    agree = np.mean(np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(original, copied, strict=True)]))
    assert gaps.mean() <= 0.5 and gaps.max() <= 3.0 and agree >= 0.9


def test_batching_loads_the_copy_and_says_so(cache: Path) -> None:
    async def ask(options: dict[str, Any]) -> dict[str, Any]:
        backend = create_backend("llamacpp", BackendSettings(endpoint="local", options=options))
        assert isinstance(backend, LlamaCppBackend)
        answer = await backend.chat(ChatRequest([{"role": "user", "content": "Say hello."}], max_tokens=4))
        assert answer.text
        return backend.summary()

    batched = anyio.run(ask, {})  # the defaults: batching, flash attention, weights auto
    assert batched["batching"] == "8 sequences" and batched["flash_attn"] is True
    assert batched["weights"].startswith("F16 copy of SmolLM2-135M-Instruct.Q4_1.gguf")
    alone = anyio.run(ask, {"batching": False})
    assert alone["batching"] == "off" and alone["flash_attn"] is False and alone["weights"] == "as given"


def test_a_cache_that_cannot_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CAI_CACHE_DIR", str(blocker / "cache"))
    path, note = weights_for(embedded_model_path(), "auto", threads=2)  # auto: the model as given, and why
    assert path == embedded_model_path() and "no F16 copy" in note and "CAI_CACHE_DIR" in note
    with pytest.raises(ConfigError, match="CAI_CACHE_DIR"):
        weights_for(embedded_model_path(), "f16", threads=2)


def test_the_copy_is_keyed_by_the_llama_cpp_version(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    source = embedded_model_path()
    copy = weights_for(source, "auto", threads=2)[0]
    assert copy.name == f"{source.stem}.{copy_key(source)}.f16.gguf"
    monkeypatch.setattr(llama_cpp, "__version__", "0.0.0-another-build")
    other = weights_for(source, "auto", threads=2)[0]  # another llama.cpp: a copy of its own, the old one unused
    assert other != copy and other.is_file() and gguf_file_type(other) == F16
    assert sorted(p.name for p in cache.joinpath("gguf").iterdir()) == sorted([copy.name, other.name])


def test_the_suite_keeps_its_copies_in_a_folder_of_its_own(_model_cache: Path) -> None:
    """tests/conftest.py points CAI_CACHE_DIR at this session's temporary folder (subprocesses inherit it)."""
    assert cache_folder() == _model_cache
    assert not _model_cache.is_relative_to(Path.home() / ".cache")
