"""Public data: the small licensed slices bundled with the package (``cai_async/data/public``; sources, licenses
and how each slice was taken are in its README and NOTICE files), and the full sets: a folder of the same
layout, or the Hugging Face Hub through ``datasets`` (``hub``: needs a network, cached after the first load)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.errors import ConfigError

if TYPE_CHECKING:
    import polars as pl

__all__ = [
    "BUNDLED", "HH_PAIRS", "HH_TURNS", "HUB", "HUB_DIR", "SOURCES", "WHOLE", "HubSet", "first_human_turns",
    "hub_frame", "read_public",
]

BUNDLED = Path(__file__).resolve().parent / "data" / "public"
"""The bundled slices, in the layout of a full data folder (``eval.data_dir``)."""
HUB_DIR = "hub"
"""The ``eval.data_dir`` value that loads the full sets from the Hugging Face Hub."""
HH_TURNS = "hh_rlhf/harmless_base_test_first_human_turns.jsonl"
HH_PAIRS = "hh_rlhf/harmless-base/test.jsonl.gz"

SOURCES = {
    HH_TURNS: "the first human turns of github.com/anthropics/hh-rlhf harmless-base/test.jsonl.gz",
    HH_PAIRS: "github.com/anthropics/hh-rlhf harmless-base/test.jsonl.gz",
    "advbench/harmful_behaviors.csv": "github.com/llm-attacks/llm-attacks data/advbench/harmful_behaviors.csv",
    "xstest/xstest_prompts.csv": "github.com/paul-rottger/exaggerated-safety xstest_prompts.csv",
    "gptfuzz/GPTFuzzer.csv": "github.com/sherdencooper/GPTFuzz datasets/prompts/GPTFuzzer.csv",
    "gptfuzz/question_list.csv": "github.com/sherdencooper/GPTFuzz datasets/questions/question_list.csv",
    "fastchat_llm_judge/vicuna_bench/question.jsonl":
        "github.com/lm-sys/FastChat fastchat/llm_judge/data/vicuna_bench/question.jsonl",
}
"""Where each file of a data folder comes from (relative path → upstream repository and path)."""

WHOLE = frozenset({"xstest/xstest_prompts.csv", "gptfuzz/GPTFuzzer.csv", "gptfuzz/question_list.csv",
                   "fastchat_llm_judge/vicuna_bench/question.jsonl"})
"""Files bundled whole (byte for byte as upstream): ``hub`` reads them from the bundle."""


def first_human_turns(chosen: list[str]) -> list[dict[str, Any]]:
    """The red-team prompts of hh-rlhf transcripts: each row's first human turn (the leading ``"\\n\\nHuman: "``
    stripped, cut at the first ``"\\n\\nAssistant:"``), exact duplicates dropped (first kept); ``n_rows``
    counts the rows sharing the prompt. The rule that made the bundled ``HH_TURNS`` file."""
    counts: dict[str, int] = {}
    firsts: dict[str, int] = {}
    for index, text in enumerate(chosen):
        prompt = text.removeprefix("\n\nHuman: ").split("\n\nAssistant:", 1)[0]
        counts[prompt] = counts.get(prompt, 0) + 1
        firsts.setdefault(prompt, index)
    return [{"id": f"hh-harmless-base-test-{index}", "prompt": prompt, "row_index": index, "n_rows": counts[prompt]}
            for prompt, index in firsts.items()]


def _turns(frame: pl.DataFrame) -> pl.DataFrame:
    import polars as pl

    return pl.DataFrame(first_human_turns(frame["chosen"].to_list()))


@dataclass(frozen=True, slots=True)
class HubSet:
    """A full set on the Hugging Face Hub: repository id, ``data_dir`` and split (None: its only split), the
    columns to rename to the bundled file's names, and how to derive the bundled file's rows."""

    repo: str
    data_dir: str | None = None
    split: str | None = None
    rename: tuple[tuple[str, str], ...] = ()
    derive: Callable[[pl.DataFrame], pl.DataFrame] | None = None


HUB = {
    HH_TURNS: HubSet("Anthropic/hh-rlhf", data_dir="harmless-base", split="test", derive=_turns),
    HH_PAIRS: HubSet("Anthropic/hh-rlhf", data_dir="harmless-base", split="test"),
    "advbench/harmful_behaviors.csv": HubSet("walledai/AdvBench", rename=(("prompt", "goal"),)),
}
"""The sliced files' full sets on the Hub, by the bundled file's relative path."""


def hub_frame(relpath: str, *, what: str, key: str = "eval.data_dir") -> pl.DataFrame:
    """The full set behind the bundled ``relpath``, loaded by name through ``datasets`` (cached by it); ``key``
    is the recipe key that chose the Hub, named in the errors."""
    import polars as pl

    spec = HUB.get(relpath)
    if spec is None:
        raise ConfigError(f"{what}: no Hugging Face Hub copy of {relpath} is known; set {key} to a folder "
                          f"holding it ({SOURCES.get(relpath, relpath)})")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{what}: data_dir hub needs the datasets package (pip install 'cai-async[train]')") from None
    try:
        loaded = datasets.load_dataset(spec.repo, data_dir=spec.data_dir, split=spec.split)
    except Exception as exc:  # network, authentication, a moved set: all end the same way for the user
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{what}: could not load {spec.repo} from the Hugging Face Hub ({type(exc).__name__}: "
                          f"{reason}); check the network, or set {key} to a folder with "
                          f"{SOURCES[relpath]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ConfigError(f"{what}: {spec.repo} has the splits {', '.join(loaded)}; expected one")
        loaded = next(iter(loaded.values()))
    frame = pl.from_arrow(loaded.data.table)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.rename({a: b for a, b in spec.rename if a in frame.columns and b not in frame.columns})
    return spec.derive(frame) if spec.derive is not None else frame


def read_public(relpath: str, data_dir: str | Path | None, *, what: str, columns: tuple[str, ...] = (),
                key: str = "eval.data_dir") -> pl.DataFrame:
    """The file ``relpath`` of a data folder: the bundled slice (``data_dir`` None), the full set from the Hub
    (``hub``; files bundled whole come from the bundle), or ``data_dir/relpath`` (JSONL or CSV). A missing file,
    or one without the ``columns`` the caller reads, is one line naming ``what``, the recipe ``key`` that chose
    the folder, and how to get the file."""
    import polars as pl

    if data_dir == HUB_DIR and relpath not in WHOLE:
        frame = hub_frame(relpath, what=what, key=key)
    else:
        root = BUNDLED if data_dir is None or data_dir == HUB_DIR else Path(data_dir)
        path = root / relpath
        if not path.is_file():
            raise ConfigError(f"{what}: {path} not found; put {SOURCES.get(relpath, relpath)} there, set "
                              f"{key}: hub (the full sets from the Hugging Face Hub), or leave {key} unset (the "
                              "slices bundled with cai-async)")
        lines = path.name.endswith(".jsonl")
        try:
            frame = pl.read_ndjson(path) if lines else pl.read_csv(path)
        except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"{what}: {path} is not readable as {'JSON lines' if lines else 'CSV'} ({reason}); put "
                              f"{SOURCES.get(relpath, relpath)} there, or leave {key} unset (the slices bundled with "
                              "cai-async)") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(f"{what}: {relpath} needs the columns {', '.join(columns)}; missing {', '.join(missing)} "
                          f"(the layout of {SOURCES.get(relpath, relpath)})")
    empty = [f"{c} (row {frame[c].is_null().arg_max()})" for c in columns if frame[c].null_count()]
    if empty:
        raise ConfigError(f"{what}: {relpath} has empty values in {', '.join(empty)}; every row needs them")
    # a column of numbers where text is read (a behaviour "1") is read as that text
    scalars = [c for c in columns if frame[c].dtype.is_numeric() or frame[c].dtype == pl.Boolean]
    return frame.with_columns(pl.col(scalars).cast(pl.String)) if scalars else frame
