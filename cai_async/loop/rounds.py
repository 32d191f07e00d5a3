"""``cai loop``: rounds of red-team → CAI data → training → measurement, each in ``RUN_DIR/round-K/``.

Round K: ``redteam`` attacks the current policy with fresh seeds; ``prompts`` turns the successful attacks into
SL prompts (plus a replay share of earlier rounds') and asks the attacker for a benign near-miss of each (into the
helpfulness mix); ``data`` runs SL-CAI and the recipe's labelling on them; ``train`` trains the recipe's stages one
after another, each from the model the previous one wrote (round 0 from ``train.model``, round K from round K−1's);
``heldout`` attacks the trained model with the held-out set fixed at round 0 (never trained on); ``eval`` measures
XSTest safe-prompt refusals and helpfulness against the round-0 policy; ``guard`` refits the guard's classifier on
the round's data. Before round 0 the held-out set is drawn and attacked once against the starting policy (the
baseline). The judge stays the recipe's through every round. ``loop.json`` records each finished step,
so a killed loop resumes at the step it was in (and the stages inside a step resume their own rows)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import yaml

from backends.errors import CaiError, RunStopped
from cai_async.card import card_data, write_card
from cai_async.engine import JUDGE, JUDGE_NAMES, EndpointConfig, Engine, EngineConfig
from cai_async.exitcodes import failed_items
from cai_async.exports import HelpfulMixConfig
from cai_async.gap_report import rate_text, read_gaps
from cai_async.guard.config import GuardConfig
from cai_async.judging import proportion
from cai_async.loop.config import START, START_GROUP, TRAINED_GROUP, LoopConfig, loop_eval_config
from cai_async.loop.data import (
    LoopState,
    attack_prompts,
    fresh_seeds,
    near_miss,
    near_miss_role,
    pick_heldout,
    read_seed_file,
    replayed,
    seed_file_redteam,
    seed_pool,
    write_seed_file,
)
from cai_async.recipes import Recipe, run_recipe
from cai_async.redteam.config import RedteamConfig
from cai_async.stages.common import gather_calls
from cai_async.stages.unit import StageResult
from cai_async.store import read_json, write_jsonl

__all__ = ["STEPS", "TRAINED_GROUP", "run_loop"]

STEPS = ("redteam", "prompts", "data", "train", "heldout", "eval", "guard")
"""A round's steps, in order."""
LITTLE_CHANGE = 0.1
"""A principle whose revisions of a round's successful attacks change less than this share of the text (the
card's mean change) is named: its revision request does not move the answers that beat the policy."""

Progress = Callable[[Engine, str], AbstractAsyncContextManager[Any]]
Report = Callable[[str], None]


def _proportion_of(gaps: dict[str, Any]) -> dict[str, Any]:
    return proportion(int(gaps["successes"]), int(gaps["attempts"]))


def _principle_rates(gaps: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per principle, over every strategy: the share of judged or refused attempts its judge flagged."""
    out = {}
    for principle, row in gaps["principles"].items():
        hits = sum(round((e["value"] or 0) * e["n"]) for e in row.values())
        out[principle] = proportion(hits, sum(e["n"] for e in row.values()))
    return out


@dataclass
class _Loop:
    recipe: Recipe
    loop: LoopConfig
    root: Path
    state: LoopState
    progress: Progress | None
    say: Report

    @property
    def redteam(self) -> RedteamConfig:
        config: RedteamConfig = self.recipe.redteam  # type: ignore[attr-defined]  # a registered stage's section
        return config

    # engines -------------------------------------------------------------------------------------------------

    def _engine(self, k: int, *, trained: Path | None = None, start: bool = False) -> EngineConfig:
        """Round ``k``'s endpoint groups: ``policy`` is the model round ``k``−1 trained (the recipe's in round 0),
        the ``judge`` stays the recipe's judge (or its starting policy); with ``start``, ``loop_start`` is the starting
        policy; given ``trained``, ``loop_trained`` is that model."""
        config = self.recipe.engine.model_copy(deep=True)
        groups = dict(config.groups)
        first = groups["policy"]
        if k > 0:
            if not any(name in groups for name in JUDGE_NAMES):
                groups[JUDGE] = first  # the judge stays the starting policy, not the trained one
            groups["policy"] = [_hf_endpoint(f"round-{k - 1}-model", self._model_after(k - 1))]
        if start:
            groups[START_GROUP] = [e.model_copy(update={"name": f"{e.name}-start"}) for e in first]
        if trained is not None:
            groups[TRAINED_GROUP] = [_hf_endpoint(f"round-{k}-model", trained)]
        return EngineConfig.model_validate({**config.model_dump(), "groups": {
            role: [e.model_dump() for e in endpoints] for role, endpoints in groups.items()}})

    def _model_after(self, k: int) -> Path:
        step = self.state.step(k, "train")
        assert step is not None, f"round {k} has not trained"
        return Path(step["model"])

    async def _run(self, run_dir: Path, engine: EngineConfig, **sections: Any) -> dict[str, Any]:
        """One recipe run of ``sections`` in ``run_dir``; its summary (also kept as ``summary-<first section>``)."""
        recipe = Recipe.model_validate({"run_dir": str(run_dir), "engine": engine, "retry_errors":
                                        self.recipe.retry_errors, "executor": self.recipe.executor,
                                        "ray": self.recipe.ray, **sections})
        reports: dict[str, StageResult] = {}
        summary = await run_recipe(recipe, progress=self.progress, reports=reports)
        (run_dir / "summary.json").replace(run_dir / f"summary-{next(iter(sections))}.json")
        return {"stages": summary["stages"], "failed": failed_items(reports.values()), "usage": _usage(summary)}

    # the held-out set ------------------------------------------------------------------------------------------

    def heldout_seeds(self) -> list[Any]:
        """The held-out seeds: drawn once (round 0) into ``RUN_DIR/heldout.jsonl``, read back afterwards."""
        path = self.root / "heldout.jsonl"
        if path.is_file():
            return read_seed_file(path)
        heldout = pick_heldout(seed_pool(self.redteam), self.loop.heldout, seed=self.loop.seed)
        write_seed_file(path, heldout)
        return heldout

    def _guard(self, k: int) -> GuardConfig | None:
        """The guard round ``k``'s attacks go through (``loop.attack_guarded``): the recipe's, with the classifier
        the latest earlier round refit; None without a guard section."""
        if self.recipe.guard is None or not self.loop.attack_guarded:
            return None
        guard = self.recipe.guard.model_copy(deep=True)
        for j in reversed(range(k)):
            refit = (self.state.step(j, "guard") or {}).get("path")
            if refit and guard.classifier is not None:
                guard.classifier.path = str(refit)
                break
        return guard

    async def _attack(self, run_dir: Path, engine: EngineConfig, config: RedteamConfig,
                      guard: GuardConfig | None) -> dict[str, Any]:
        """``config``'s attacks into ``run_dir``, and with ``guard`` the same attacks behind it into
        ``run_dir/guarded``: their gaps, usage and failures (``guarded``: the guarded run's gaps, or None)."""
        ran = await self._run(run_dir, engine, redteam=config)
        found = {"gaps": _gaps(run_dir), "usage": ran["usage"], "failed": ran["failed"], "guarded": None}
        if guard is not None:
            behind = await self._run(run_dir / "guarded", engine, redteam=config.model_copy(
                update={"through_guard": True}), guard=guard)
            found["guarded"] = _gaps(run_dir / "guarded")
            found["usage"] = _summed([found["usage"], behind["usage"]])
            found["failed"] += behind["failed"]
        return found

    async def _attack_heldout(self, k: int, run_dir: Path, engine: EngineConfig, target: str) -> dict[str, Any]:
        config = seed_file_redteam(self.redteam, self.root / "heldout.jsonl", target,
                                   self.loop.heldout_strategies)
        found = await self._attack(run_dir, engine, config, self._guard(k))
        full, guarded = found["gaps"], found["guarded"]
        return {"asr": _proportion_of(full), "principles": _principle_rates(full),
                "strategies": full["strategies"], "usage": found["usage"], "failed": found["failed"],
                "guarded_asr": _proportion_of(guarded) if guarded is not None else None}

    async def baseline(self) -> dict[str, Any]:
        """Held-out attack success against the starting policy (once, before round 0)."""
        if self.state.data["baseline"] is None:
            self.heldout_seeds()
            start = time.perf_counter()
            found = await self._attack_heldout(0, self.root / "start", self._engine(0), "policy")
            found["seconds"] = round(time.perf_counter() - start, 1)
            self.state.data["baseline"] = found
            self.state.save()
            self.say(f"start · held-out attack success {rate_text(found['asr'])} against the starting policy"
                     + _behind(found["guarded_asr"]))
        baseline: dict[str, Any] = self.state.data["baseline"]
        return baseline

    # one round -------------------------------------------------------------------------------------------------

    async def run_round(self, k: int) -> None:
        """Every step of round ``k`` not yet recorded, then its metrics."""
        for name in STEPS:
            if self.state.step(k, name) is not None:
                continue
            start = time.perf_counter()
            info = await getattr(self, f"_step_{name}")(k, self.root / f"round-{k}")
            info["seconds"] = round(time.perf_counter() - start, 1)
            self.state.record(k, name, info)
            self.say(f"round {k} · {name}: {info.get('line', 'done')} · {info['seconds']:.0f}s")
            if info.get("stop"):
                self.state.data["stopped"] = {"round": k, "step": name, "reason": info["stop"]}
                self.state.save()
                return
        self.state.round(k)["metrics"] = self._metrics(k)
        self.state.save()

    async def _step_redteam(self, k: int, out: Path) -> dict[str, Any]:
        used = {s.id for j in range(k) for s in read_seed_file(self.root / f"round-{j}" / "seeds.jsonl")}
        seeds = fresh_seeds(seed_pool(self.redteam), self.heldout_seeds(), used, self.loop, self.redteam,
                            round_index=k)
        fresh = seed_file_redteam(self.redteam, write_seed_file(out / "seeds.jsonl", seeds), "policy")
        found = await self._attack(out, self._engine(k), fresh, self._guard(k))
        full, guarded = found["gaps"], found["guarded"]
        asr = _proportion_of(full)
        guarded_asr = _proportion_of(guarded) if guarded is not None else None
        return {"asr": asr, "strategies": full["strategies"], "uncovered": len(full["uncovered"]),
                "usage": found["usage"], "failed": found["failed"], "guarded_asr": guarded_asr,
                "line": f"{full['successes']} of {full['attempts']} attacks got through ({rate_text(asr)})"
                        + _behind(guarded_asr)}

    async def _step_prompts(self, k: int, out: Path) -> dict[str, Any]:
        attacks = attack_prompts(out)
        found = len(attacks)
        if self.loop.max_attack_prompts is not None and found > self.loop.max_attack_prompts:
            rng = random.Random(f"attacks:{self.loop.seed}:{k}")
            attacks = sorted(rng.sample(attacks, self.loop.max_attack_prompts), key=lambda a: str(a["id"]))
        if not attacks:
            return {"attacks": 0, "stop": f"no attack got through in round {k}: nothing to train on",
                    "line": "no successful attack: the loop stops here", "usage": {}}
        earlier = [self.root / f"round-{j}" / "prompts.jsonl" for j in range(k)]
        replay = replayed(earlier, self.loop.replay, len(attacks), seed=self.loop.seed, round_index=k)
        write_jsonl(out / "prompts.jsonl", [*attacks, *replay])
        misses: list[str] = []
        usage: dict[str, Any] = {}
        if self.loop.near_misses:
            role = near_miss_role(self.redteam, self.recipe.engine.groups)
            behaviours = list(dict.fromkeys(str(a["behaviour"]) for a in attacks))
            async with Engine(self._engine(k), run_dir=out) as engine:
                before = engine.accounting.cost_usd
                outcomes = await gather_calls([partial(near_miss, engine, role, b, seed=self.loop.seed,
                                                       max_tokens=self.loop.near_miss_max_tokens)
                                               for b in behaviours], together=True)
                written = [o for o in outcomes if not isinstance(o, CaiError)]
                if len(written) < len(outcomes):  # as before: a failed call stops the step (a rerun resumes it)
                    raise next(o for o in outcomes if isinstance(o, CaiError))
                usage = {"calls": len(behaviours), "cost_usd": round(engine.accounting.cost_usd - before, 6)}
            misses = list(dict.fromkeys(m for m in written if m))
        rows = [{"id": f"near-miss:{i}", "prompt": [{"role": "user", "content": m}], "origin": "near_miss"}
                for i, m in enumerate(misses)]
        sl = self.recipe.sl
        helpful = sl.export.helpful if sl is not None else None
        if helpful is not None:
            rows += [{"id": f"helpful:{r.id}", "prompt": r.conversation(), "origin": "helpful"} for r in
                     _helpful_rows(helpful)]
        write_jsonl(out / "helpful.jsonl", rows)
        return {"attacks": len(attacks), "successes": found, "replayed": len(replay), "near_misses": len(misses),
                "usage": usage, "line": f"{len(attacks)} attack prompts (of {found} successes) + {len(replay)} "
                                        f"replayed; {len(misses)} near-misses"}

    async def _step_data(self, k: int, out: Path) -> dict[str, Any]:
        sl = self.recipe.sl
        assert sl is not None
        helpful: HelpfulMixConfig | None = sl.export.helpful or HelpfulMixConfig(input="", ratio=0.2)
        if (out / "helpful.jsonl").stat().st_size == 0:
            helpful = None  # no near-miss was usable and the recipe mixes in no helpfulness data
        elif helpful is not None:
            helpful = helpful.model_copy(update={"input": str(out / "helpful.jsonl"), "id_column": "id",
                                                 "prompt_column": "prompt", "response_column": None, "limit": None})
        export = sl.export.model_copy(update={"helpful": helpful})
        config = sl.model_copy(update={"input": str(out / "prompts.jsonl"), "id_column": "id",
                                       "prompt_column": "prompt", "limit": None, "export": export})
        sections: dict[str, Any] = {"sl": config}
        if self.recipe.label is not None:
            sections["label"] = self.recipe.label
        ran = await self._run(out, self._engine(k), **sections)
        sft = ran["stages"].get("sl", {}).get("exports", {})
        stats = (card_data(sl.constitution, run_dir=out)["run"] or {}).get("principles", {})
        change = {name: s["mean_change"] for name, s in stats.items() if s["mean_change"] is not None}
        little = sorted(name for name, value in change.items() if value < LITTLE_CHANGE)
        return {"usage": ran["usage"], "failed": ran["failed"], "exports": sft, "revision_change": change,
                "changes_little": little,
                "line": f"SL-CAI and labels written ({ran['failed']} failed)" + (
                    f"; revisions under {', '.join(little)} changed < {LITTLE_CHANGE:.0%} of the text" if little
                    else "")}

    async def _step_train(self, k: int, out: Path) -> dict[str, Any]:
        train = self.recipe.train
        assert train is not None
        model = train.model if k == 0 else str(self._model_after(k - 1))
        gguf = train.gguf_file if k == 0 else None
        losses: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        for stage in train.stages:
            if _rows(out / "exports" / f"{_EXPORTS.get(stage, 'dpo')}.parquet") == 0:
                skipped.append(stage)  # e.g. every pair a tie: nothing to learn, the model goes on unchanged
                continue
            config = train.model_copy(update={"stages": [stage], "model": model, "gguf_file": gguf, "merge": True,
                                              "output_dir": None})
            ran = await self._run(out, self._engine(k), train=config)
            report = ran["stages"][f"train/{stage}"]
            losses[stage] = {"first": report.get("first_loss"), "last": report.get("last_loss"),
                             "steps": report.get("steps")}
            folder = out / "train" / stage
            model, gguf = str(folder / "merged" if train.lora.enabled else folder), None
        line = ", ".join(f"{s} loss {v['first']:.3f} → {v['last']:.3f}" for s, v in losses.items()
                         if v["first"] is not None and v["last"] is not None) or "nothing trained"
        if skipped:
            line += f"; skipped {', '.join(skipped)}: its export has no rows"
        return {"model": model, "losses": losses, "skipped": skipped, "usage": {}, "line": line}

    async def _step_heldout(self, k: int, out: Path) -> dict[str, Any]:
        found = await self._attack_heldout(k, out / "heldout", self._engine(k, trained=self._model_after(k)),
                                           TRAINED_GROUP)
        return {**found, "line": f"held-out attack success {rate_text(found['asr'])} against round {k}'s model"
                                 + _behind(found["guarded_asr"])}

    async def _step_eval(self, k: int, out: Path) -> dict[str, Any]:
        name = f"round-{k}"
        config = loop_eval_config(self.recipe, self.loop, k)
        ran = await self._run(out, self._engine(k, trained=self._model_after(k), start=True), eval=config)
        models = read_json(out / "eval" / "metrics.json")["models"]
        if self.recipe.sl is not None:  # the round on the card: revisions per principle, gaps, before vs after
            write_card(self.recipe.sl.constitution, out / "card", run_dir=out)
        refusal = models[name]["overrefusal_rule"]
        win = models[name].get("helpful_win_rate")
        return {"xstest_refusal": refusal, "xstest_refusal_start": models[START]["overrefusal_rule"],
                "helpful_win_rate": win, "usage": ran["usage"], "failed": ran["failed"],
                "line": f"XSTest safe prompts refused {rate_text(refusal)}; helpfulness vs start "
                        f"{rate_text(win) if win else '-'}"}

    async def _step_guard(self, k: int, out: Path) -> dict[str, Any]:
        guard = self.recipe.guard
        if guard is None or not self.loop.retrain_guard:
            return {"usage": {}, "line": "no guard section: skipped"}
        from cai_async.guard.classifier import ClassifierRefused
        from cai_async.guard.fit import fit_guard_classifier

        config = guard.model_copy(deep=True)
        config.train.output_dir = str(out / "guard" / "classifier")
        try:
            summary = await anyio.to_thread.run_sync(
                lambda: fit_guard_classifier(out, config, self._engine(k)))
        except ClassifierRefused as exc:
            return {"usage": {}, "refused": str(exc), "line": f"classifier not written: {exc}"}
        held = summary["held_out"]
        return {"usage": {}, "path": summary["path"], "auc": held["auc"],
                "line": f"classifier refit: held-out AUC {held['auc']:.3f} → {summary['path']}"}

    def _metrics(self, k: int) -> dict[str, Any]:
        steps = self.state.round(k)["steps"]
        usage = _summed(s.get("usage") or {} for s in steps.values())
        return {
            "heldout_asr": steps["heldout"]["asr"], "fresh_asr": steps["redteam"]["asr"],
            "heldout_asr_guarded": steps["heldout"].get("guarded_asr"),
            "fresh_asr_guarded": steps["redteam"].get("guarded_asr"),
            "heldout_principles": steps["heldout"]["principles"],
            "revision_change": steps["data"].get("revision_change", {}),
            "changes_little": steps["data"].get("changes_little", []),
            "xstest_refusal": steps["eval"]["xstest_refusal"], "helpful_win_rate": steps["eval"]["helpful_win_rate"],
            "cost_usd": usage["cost_usd"], "calls": usage["calls"],
            "seconds": {name: s["seconds"] for name, s in steps.items()},
            "model": steps["train"]["model"],
        }

    # stopping --------------------------------------------------------------------------------------------------

    def spent(self) -> float:
        """Dollars the loop has spent (every recorded step, and the baseline)."""
        steps = [s for r in self.state.data["rounds"] for s in r["steps"].values()]
        baseline = self.state.data["baseline"] or {}
        return sum(float((s.get("usage") or {}).get("cost_usd") or 0) for s in [*steps, baseline])

    def plateau(self) -> str | None:
        """Why the loop should stop for lack of progress (``patience`` rounds without held-out attack success
        falling below its best by ``min_drop``), or None."""
        baseline = self.state.data["baseline"]
        if baseline is None or baseline["asr"]["value"] is None:
            return None
        best, stale = float(baseline["asr"]["value"]), 0
        for entry in self.state.finished_rounds():
            value = entry["metrics"]["heldout_asr"]["value"]
            if value is not None and value < best - self.loop.min_drop:
                best, stale = float(value), 0
            else:
                stale += 1
        if stale >= self.loop.patience:
            return (f"held-out attack success has not fallen below {best:.0%} for {stale} round(s) "
                    f"(loop.patience {self.loop.patience})")
        return None


_EXPORTS = {"sft": "sft", "reward": "reward"}
"""The export each training stage reads (the others: dpo)."""


def _rows(path: Path) -> int:
    if not path.is_file():
        return -1  # not there: the stage's own input check says what is missing
    return int(pl.scan_parquet(path).select(pl.len()).collect().item())


def _hf_endpoint(name: str, path: Path) -> EndpointConfig:
    return EndpointConfig.model_validate({"name": name, "backend": "transformers", "model": str(path)})


def _helpful_rows(helpful: HelpfulMixConfig) -> list[Any]:
    from cai_async.prompts import load_prompts

    rows = load_prompts(helpful.input, column=helpful.prompt_column, id_column=helpful.id_column)
    return rows[: helpful.limit] if helpful.limit else rows


def _summed(usages: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Calls, tokens and dollars of several usage records together."""
    usages = list(usages)
    return {"calls": sum(int(u.get("calls") or 0) for u in usages),
            "tokens": sum(int(u.get("tokens") or 0) for u in usages),
            "cost_usd": round(sum(float(u.get("cost_usd") or 0) for u in usages), 6)}


def _usage(summary: dict[str, Any]) -> dict[str, Any]:
    return _summed(s.get("usage") or {} for s in summary["stages"].values() if isinstance(s, dict))


def _behind(guarded: dict[str, Any] | None) -> str:
    return f"; behind the guard {rate_text(guarded)}" if guarded is not None else ""


def _gaps(run_dir: Path) -> dict[str, Any]:
    gaps = read_gaps(run_dir)
    assert gaps is not None, f"{run_dir}: the redteam stage wrote no gaps"
    return gaps


async def run_loop(recipe: Recipe, loop: LoopConfig, *, progress: Progress | None = None,
                   say: Report = print) -> dict[str, Any]:
    """Run (or resume) the loop: the held-out baseline, then rounds until ``loop.rounds``, the budget, no
    successful attack, or ``loop.patience``; write ``loop.json`` and the loop report; return the state."""
    from cai_async.loop.report import write_loop_report

    root = Path(recipe.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "loop.yaml").write_text(yaml.safe_dump({"loop": loop.model_dump(mode="json"), **recipe.model_dump(
        mode="json")}, sort_keys=False), encoding="utf-8")
    state = LoopState(root)
    runner = _Loop(recipe, loop, root, state, progress, say)
    state.data["stopped"] = None
    try:
        await runner.baseline()
        for k in range(loop.rounds):
            if state.round(k)["metrics"] is not None:
                continue
            if loop.budget_usd is not None and (spent := runner.spent()) >= loop.budget_usd:
                raise RunStopped(f"the loop's budget is spent (${spent:.4f} of loop.budget_usd "
                                 f"${loop.budget_usd}); raise it and rerun to go on from round {k}")
            if k > 0 and (why := runner.plateau()) is not None:
                state.data["stopped"] = {"round": k, "step": None, "reason": why}
                break
            await runner.run_round(k)
            if state.data["stopped"] is not None:
                break
        else:
            state.data["stopped"] = {"round": loop.rounds, "step": None,
                                     "reason": f"{loop.rounds} round(s) done (loop.rounds)"}
    finally:
        while state.data["rounds"] and not state.data["rounds"][-1]["steps"]:
            state.data["rounds"].pop()  # a round that never started is not a round
        state.save()
        if state.data["baseline"] is not None:
            state.data["report"] = str(write_loop_report(state.data, root))
            state.save()
    return state.data
