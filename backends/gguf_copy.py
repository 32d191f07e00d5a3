"""Half-precision copies of small Q4_1 GGUF models, for batched decoding on a CPU.

llama.cpp's CPU backend multiplies a batch of tokens by F16, Q8_0, Q4_0 and K-quant weights with batched kernels
(tinyBLAS, or weights repacked at load), but by Q4_1 weights (the embedded SmolLM2's type) one row and one token
at a time. Measured on this 2-core machine, the quickstart's SL work with 8 sequences decoded together: 83.5
completion tokens/s on the Q4_1 file, 110.9 on its F16 copy (1.33×). Decoding one sequence at a time is bound by
reading the weights, so there the smaller Q4_1 file is faster (82 vs 63 tokens/s): the copy is only used when
calls are batched.

The copy holds the same weights: every Q4_1 weight ``d·q + m`` rounded to half precision (relative error at most
2⁻¹¹, against 4-bit ``q``). The F16 kernels keep activations in higher precision than the Q4_1 kernels (which
round them to 8 bits), so logits differ from the Q4_1 file's by about 0.2 on average (1.4 at most on the
prompts tried), the size of difference a batch's summation order already makes; the greedy choice agreed at
34 of 34 positions. It is made once (about a second for 135M parameters), written atomically into the cache
folder and keyed by the source's path, size and modification time and the llama-cpp-python version that wrote it;
sources over :data:`MAX_SOURCE_BYTES` are used as they are (their copy would be 3.2× their size).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from backends.errors import ConfigError

__all__ = [
    "MAX_SOURCE_BYTES", "WeightsChoice", "cache_folder", "copy_key", "gguf_file_type", "quiet_stderr", "weights_for",
]

WeightsChoice = Literal["auto", "as-is", "f16"]
MAX_SOURCE_BYTES = 600 * 1024 * 1024
"""Largest Q4_1 file copied to F16 by ``auto`` (about 1B parameters; the copy about 2 GB)."""
_Q4_1, _F16 = 3, 1  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_1 and LLAMA_FTYPE_MOSTLY_F16 (general.file_type)


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (llama.cpp's C-level logging ignores ``verbose=False`` in places)."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cache_folder() -> Path:
    """Where derived model files live: ``$CAI_CACHE_DIR``, else ``$XDG_CACHE_HOME/cai-async``, else
    ``~/.cache/cai-async``."""
    if os.environ.get("CAI_CACHE_DIR"):
        return Path(os.environ["CAI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cai-async"


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` of a GGUF file (llama.cpp's ``LLAMA_FTYPE_*``), read with its vocabulary only."""
    from llama_cpp import Llama

    with quiet_stderr():
        vocab: Any = Llama(model_path=str(path), vocab_only=True, verbose=False, n_ctx=64)
    value = vocab.metadata.get("general.file_type")
    return int(value) if value is not None and str(value).isdigit() else None


def weights_for(path: Path, choice: WeightsChoice, *, threads: int) -> tuple[Path, str]:
    """The file a batched decoder should load for ``path``, and one line saying what it is.

    ``as-is``: ``path``. ``f16``: an F16 copy of any GGUF. ``auto``: an F16 copy of a Q4_1 file of at most
    :data:`MAX_SOURCE_BYTES`, else ``path``."""
    if choice == "as-is":
        return path, "as given"
    stat = path.stat()
    if choice == "auto":
        if stat.st_size > MAX_SOURCE_BYTES:
            return path, "as given (too large for an F16 copy)"
        kind = gguf_file_type(path)
        if kind != _Q4_1:
            return path, "as given (its type has batched CPU kernels)" if kind != _F16 else "as given (F16)"
    key = copy_key(path, stat)
    target = cache_folder() / "gguf" / f"{path.stem}.{key}.f16.gguf"
    if not target.exists():
        try:
            _convert(path, target, threads=threads)
        except (OSError, RuntimeError) as exc:
            if choice == "f16":
                raise ConfigError(f"weights f16: {exc}; set CAI_CACHE_DIR to a writable folder or use "
                                  "weights: as-is") from None
            return path, f"as given (no F16 copy: {exc}; set CAI_CACHE_DIR to a writable folder)"
    return target, f"F16 copy of {path.name} for batched CPU kernels ({target})"


def copy_key(path: Path, stat: os.stat_result | None = None) -> str:
    """The cache key of ``path``'s F16 copy: its resolved path, size and modification time, and the llama.cpp
    build that writes and reads the copy (a new llama-cpp-python may change the GGUF it writes or the kernels it
    was measured with, so an upgrade makes a fresh copy rather than loading an old one)."""
    import llama_cpp

    stat = stat or path.stat()
    version = getattr(llama_cpp, "__version__", "unknown")
    source = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0llama-cpp-python {version}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _convert(source: Path, target: Path, *, threads: int) -> None:
    import llama_cpp

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = _F16, True, threads
    try:
        with quiet_stderr():
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if code != 0:
            raise RuntimeError(f"llama.cpp could not write an F16 copy of {source} (code {code})")
        os.replace(partial, target)  # a killed conversion leaves no half file under the real name
    finally:
        partial.unlink(missing_ok=True)
