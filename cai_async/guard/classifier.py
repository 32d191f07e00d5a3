"""The guard's classifier tier: a small sequence classifier (transformers, trainable on a CPU in seconds to
minutes) that scores P(violation) of a request or an exchange, trained on :mod:`cai_async.guard.training_data`,
with two thresholds calibrated on held-out examples and written beside it (``calibration.json``): at or above
``hi`` it blocks (at most ``target_fpr`` of held-out fine texts score that high), below ``lo`` it allows (at most
``target_miss`` of held-out violations score that low); in between, the next tier is asked. A classifier whose
held-out scores do not separate (all alike, or an AUC below a floor) is not written: :class:`ClassifierRefused`.

By default the model is a tiny BERT-style encoder trained from scratch on the vocabulary of a tokenizer already
on the machine (the embedded SmolLM2's, read from its GGUF): nothing is downloaded, at training or at run time.
torch and transformers are imported inside the functions."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from backends.atomic import read_json, write_atomic, write_json
from backends.errors import CaiError, ConfigError
from backends.microbatch import MicroBatcher
from cai_async.guard.config import GuardTrainConfig
from cai_async.guard.training_data import Example, split_examples

__all__ = [
    "CALIBRATION",
    "MIN_AUC",
    "MIN_SPREAD",
    "ClassifierRefused",
    "GuardClassifier",
    "ScoreBatcher",
    "calibrate",
    "separation_problem",
    "train_guard_classifier",
]

CALIBRATION = "calibration.json"
"""The calibration file beside the model: thresholds, how they were set, held-out figures."""
MIN_SPREAD = 0.01
"""The least spread (max − min) of a trained classifier's held-out scores for ``cai train guard`` to write it: below
it, the model scores every text alike (it collapsed to a constant) and its thresholds would sit in float noise."""
MIN_AUC = 0.6
"""The least held-out AUC for ``cai train guard`` to write a classifier: below it, its scores barely tell the
violating texts from the fine ones (0.5: a coin)."""


class ClassifierRefused(CaiError):
    """A trained guard classifier whose held-out scores do not separate the classes; nothing was written. The
    message says what was wrong and what to do (``cai train guard`` exits 3 with it)."""


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int, prefix_id: int | None) -> dict[str, Any]:
    """Token ids (the end of a long text kept), with the pooling token first when the model has no [CLS] of its
    own, padded on the right; as torch tensors."""
    import torch

    room = max_length - (prefix_id is not None)
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=room)["input_ids"]
    if prefix_id is not None:
        ids = [[prefix_id, *row] for row in ids]
    width = max(1, max(len(row) for row in ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask}


def _tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    from cai_async.train.models import resolve_model

    folder, gguf = resolve_model(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.truncation_side = "left"
    return tokenizer


def _model(config: GuardTrainConfig, tokenizer: Any) -> tuple[Any, int | None]:
    """The model to train and the id of the pooling token to put first (None: the tokenizer adds a [CLS])."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if config.base_model is not None:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(config.base_model, num_labels=1)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"guard.train.base_model {config.base_model!r}: cannot load ({exc})") from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, None if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    if config.hidden % config.heads:
        raise ConfigError(f"guard.train.hidden ({config.hidden}) must be a multiple of heads ({config.heads})")
    torch.manual_seed(config.seed)
    bert = BertConfig(vocab_size=len(tokenizer), hidden_size=config.hidden, num_hidden_layers=config.layers,
                      num_attention_heads=config.heads, intermediate_size=config.hidden * 2,
                      max_position_embeddings=config.max_length, pad_token_id=tokenizer.pad_token_id,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    bert.num_labels = 1
    prefix = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    return BertForSequenceClassification(bert), prefix


def calibrate(benign: Sequence[float], violating: Sequence[float], *, target_fpr: float,
              target_miss: float) -> dict[str, Any]:
    """``hi``: a score at or above which at most ``target_fpr`` of the benign scores lie; ``lo``: a score below
    which at most ``target_miss`` of the violating scores lie (never above ``hi``); and what they give on the
    scores themselves: FPR and recall at ``hi``, and the share of texts between the two (left to the next tier)."""
    if len(benign) < 2 or len(violating) < 2:
        raise ConfigError(f"guard classifier: {len(benign)} fine and {len(violating)} violating held-out examples; "
                          "calibration needs at least 2 of each (more data: sl/helpful stages, guard.train.public, "
                          "guard.train.generate)")
    high = sorted(benign, reverse=True)
    hi = min(1.0, math.nextafter(high[math.floor(target_fpr * len(high))], 2.0))
    low = sorted(violating)
    lo = min(low[math.floor(target_miss * len(low))], hi)
    everything = [*benign, *violating]
    pairs = sum((v > b) + 0.5 * (v == b) for v in violating for b in benign)
    return {
        "lo": lo, "hi": hi, "target_fpr": target_fpr, "target_miss": target_miss,
        "held_out": {
            "fine": len(benign), "violating": len(violating), "spread": max(everything) - min(everything),
            "fpr_at_hi": sum(s >= hi for s in benign) / len(benign),
            "recall_at_hi": sum(s >= hi for s in violating) / len(violating),
            "miss_below_lo": sum(s < lo for s in violating) / len(violating),
            "share_between": sum(lo <= s < hi for s in everything) / len(everything),
            "auc": pairs / (len(benign) * len(violating)),
        },
    }


def separation_problem(held_out: dict[str, Any], *, min_spread: float = MIN_SPREAD,
                       min_auc: float = MIN_AUC) -> str | None:
    """What is wrong with a classifier whose held-out figures (:func:`calibrate`'s ``held_out``) are these: its
    scores spread less than ``min_spread`` (max − min), or its AUC is below ``min_auc``; None when neither."""
    fix = ("train on more, and more varied, examples of both kinds (more sl/helpful rows, guard.train.public: true, "
           "guard.train.generate) or for longer (guard.train.epochs, guard.train.learning_rate)")
    spread, auc = float(held_out["spread"]), float(held_out["auc"])
    if spread < min_spread:
        return (f"guard classifier not written: its {held_out['fine'] + held_out['violating']} held-out scores "
                f"spread over only {spread:.2g} (max − min; the floor is {min_spread:g}), so it scores every text "
                f"alike; {fix}")
    if auc < min_auc:
        return (f"guard classifier not written: its held-out AUC is {auc:.3f} (the floor is {min_auc:g}), so its "
                f"scores barely tell the {held_out['violating']} violating held-out texts from the "
                f"{held_out['fine']} fine ones; {fix}")
    return None


def _batches(examples: list[Example], size: int, rng: random.Random) -> list[list[Example]]:
    order = examples[:]
    rng.shuffle(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


def train_guard_classifier(config: GuardTrainConfig, examples: Sequence[Example], out_dir: str | Path, *,
                           label: str = "constitution", min_spread: float = MIN_SPREAD,
                           min_auc: float = MIN_AUC) -> dict[str, Any]:
    """Train on ``examples`` (held out by hash for calibration), write the model, its tokenizer and
    ``calibration.json`` to ``out_dir``; return the calibration with training figures. ``label`` is the name a
    refusal gives the violated principle. A classifier whose held-out scores spread less than ``min_spread`` or
    whose held-out AUC is below ``min_auc`` is not written: :class:`ClassifierRefused` (``out_dir`` untouched)."""
    import torch

    train, test = split_examples(examples, config.held_out, seed=config.seed)
    if not train:
        raise ConfigError("guard classifier: no training examples (run the sl stage first, or set "
                          "guard.train.public: true)")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, train, test, Path(out_dir), label, min_spread=min_spread, min_auc=min_auc)
    finally:
        torch.set_num_threads(threads)


def _train(config: GuardTrainConfig, train: list[Example], test: list[Example], out: Path, label: str, *,
           min_spread: float, min_auc: float) -> dict[str, Any]:
    import torch

    tokenizer = _tokenizer(config.tokenizer)
    model, prefix = _model(config, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    rng = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses: list[float] = []
    start = time.perf_counter()
    batches: list[list[Example]] = []
    for step in range(total):
        if not batches:
            batches = _batches(train, config.batch_size, rng)
        batch = batches.pop()
        encoded = _encode(tokenizer, [e.text for e in batch], config.max_length, prefix)
        logits = model(**encoded).logits.squeeze(-1)
        loss = loss_fn(logits, torch.tensor([e.target for e in batch], dtype=torch.float32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        for group in optimizer.param_groups:  # linear decay to a tenth
            group["lr"] = config.learning_rate * (1 - 0.9 * (step + 1) / total)
    seconds = time.perf_counter() - start
    model.eval()
    classifier = GuardClassifier(model, tokenizer, {"lo": 0.0, "hi": 1.0, "prefix_id": prefix,
                                                    "max_length": config.max_length, "label": label})
    scores = classifier.score([e.text for e in test]) if test else []
    benign = [s for s, e in zip(scores, test, strict=True) if e.target < 0.5]
    violating = [s for s, e in zip(scores, test, strict=True) if e.target > 0.5]
    calibration = calibrate(benign, violating, target_fpr=config.target_fpr, target_miss=config.target_miss)
    problem = separation_problem(calibration["held_out"], min_spread=min_spread, min_auc=min_auc)
    if problem is not None:
        raise ClassifierRefused(problem)
    sources: dict[str, int] = {}
    for example in train:
        sources[example.source.split(":")[0]] = sources.get(example.source.split(":")[0], 0) + 1
    calibration.update({
        "prefix_id": prefix, "max_length": config.max_length, "label": label,
        "model": config.base_model or f"bert from scratch (hidden {config.hidden}, {config.layers} layers) on the "
                                      f"{config.tokenizer} tokenizer",
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {"examples": len(train), "held_out": len(test), "sources": sources, "steps": total,
                     "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
                     "seconds": round(seconds, 2)},
    })
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / CALIBRATION, calibration)
    write_atomic(out / "losses.json", json.dumps(losses))
    return {"path": str(out), **calibration}


class GuardClassifier:
    """A trained guard classifier: ``score`` gives P(violation) per text; ``lo``/``hi`` from its calibration."""

    def __init__(self, model: Any, tokenizer: Any, calibration: dict[str, Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.lo = float(calibration["lo"])
        self.hi = float(calibration["hi"])
        self.label = str(calibration.get("label") or "constitution")
        self.max_length = int(calibration["max_length"])
        self.prefix_id: int | None = calibration.get("prefix_id")

    @classmethod
    def load(cls, path: str | Path, *, lo: float | None = None, hi: float | None = None,
             threads: int | None = None) -> GuardClassifier:
        """The classifier ``cai train guard`` wrote to ``path`` (thresholds overridable); ``threads`` sets torch's
        thread count for this process."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path)
        if not (folder / CALIBRATION).is_file():
            raise ConfigError(f"guard.classifier.path: {folder} holds no trained guard classifier ({CALIBRATION} "
                              "missing); run `cai train guard` first")
        calibration = read_json(folder / CALIBRATION)
        calibration.update({k: v for k, v in (("lo", lo), ("hi", hi)) if v is not None})
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.truncation_side = "left"
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        model.eval()
        if threads is not None:
            torch.set_num_threads(threads)
        return cls(model, tokenizer, calibration)

    def score(self, texts: Sequence[str]) -> list[float]:
        """P(violation) of each text (blocking: run it in a worker thread from async code)."""
        import torch

        if not texts:
            return []
        with torch.inference_mode():
            encoded = _encode(self.tokenizer, texts, self.max_length, self.prefix_id)
            logits = self.model(**encoded).logits.squeeze(-1)
            return [float(p) for p in torch.sigmoid(logits).reshape(-1)]


class ScoreBatcher:
    """Scores texts from many concurrent callers in shared forward passes, one at a time in a worker thread
    (:class:`backends.microbatch.MicroBatcher`): texts that arrive while a pass runs go in the next one, up to
    ``max_batch`` a pass; a pass whose caller is cancelled still answers the others."""

    def __init__(self, score: Callable[[Sequence[str]], list[float]], *, max_batch: int = 32) -> None:
        self._score = score
        self._batcher: MicroBatcher[str, float] = MicroBatcher(
            self._pass, max_batch=max_batch, limiter=anyio.CapacityLimiter(1), shield=True)

    async def _pass(self, texts: list[str]) -> list[float]:
        return await anyio.to_thread.run_sync(self._score, texts)

    async def score(self, text: str) -> float:
        """P(violation) of ``text``; the classifier's exception when its pass failed."""
        return await self._batcher.submit(text)
