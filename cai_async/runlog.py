"""A quiet console: third-party warnings, log records and progress bars go to the run's log file
(``RUN_DIR/run.log``) instead of the terminal, unless ``--verbose`` asks to see them too."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["LOG_NAME", "OUR_LOGGERS", "attach_run_log", "quiet_console"]

LOG_NAME = "run.log"
OUR_LOGGERS = ("cai_async", "backends")
"""Loggers whose warnings a user needs on the console (an endpoint down, a retry storm); every other
library's records only reach the console with ``--verbose``."""

_QUIET_ENV = {
    "TQDM_DISABLE": "1",  # tqdm ≥ 4.66 reads TQDM_* defaults: datasets', transformers' and hub bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OursOnly(logging.Filter):
    """Passes our own loggers' records; other libraries' (and ``py.warnings``) only when verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name.split(".")[0] in OUR_LOGGERS


def quiet_console(*, verbose: bool) -> None:
    """Set up logging for a CLI process: our warnings (everything with ``verbose``) on stderr, Python warnings
    routed through logging, and third-party progress bars switched off unless ``verbose``. Call it before
    torch, transformers or datasets are imported (their bars read the environment once)."""
    if not verbose:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_cai_console", False):
            root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(_OursOnly(verbose))
    console._cai_console = True  # type: ignore[attr-defined]
    root.addHandler(console)
    logging.captureWarnings(True)
    for noisy in ("urllib3", "filelock", "fsspec", "asyncio", "matplotlib", "PIL", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def attach_run_log(run_dir: str | Path) -> Path:
    """Also write every log record and warning (third parties' too) to ``RUN_DIR/run.log``; returns its path.
    Attaching again for the same file is a no-op."""
    path = Path(run_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path.resolve():
            return path
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    _quiet_library_loggers()
    return path


def _quiet_library_loggers() -> None:
    """transformers and datasets keep their own handlers on stderr; send their records up to ours instead."""
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "huggingface_hub"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
