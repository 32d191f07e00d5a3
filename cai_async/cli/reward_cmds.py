"""``cai reward serve``: OpenRLHF's remote reward protocol over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import anyio
import typer

__all__ = ["reward_app"]

reward_app = typer.Typer(help="Rewards for RL engines: OpenRLHF's remote reward protocol over HTTP.",
                         no_args_is_help=True)


@reward_app.command("serve")
def reward_serve(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML/JSON/TOML (engine, train).",
                                                  show_default=False)] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 5000; 0: any free one).")] = None,
    reward_from: Annotated[Literal["judge", "critic", "reward_model"] | None, typer.Option(
        "--from", help="judge: the constitutional reward on the engine's judge group (critic: its old name); "
                       "reward_model: a trained one.")] = None,
    reward_model: Annotated[str | None, typer.Option(help="Reward model folder (default: the run's).")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Run directory (cache, trained reward model).")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key.")] = None,
) -> None:
    """Serve rewards at http://HOST:PORT/get_reward for OpenRLHF (``--reward.remote_url``): POST
    {"query": [...], "prompts": [...], "labels": [...]} → {"rewards": [...]} (defaults → RECIPE → flags)."""
    from cai_async.cli.console import console
    from cai_async.cli.flags import load_with_flags
    from cai_async.runlog import attach_run_log
    from cai_async.train.config import TrainConfig
    from cai_async.train.reward_server import serve_rewards, service_for

    extra = {"run_dir": run_dir, "train.reward_server.host": host, "train.reward_server.port": port,
             "train.reward_server.reward_from": reward_from, "train.reward_server.reward_model": reward_model}
    recipe_obj = load_with_flags(recipe, sets or [], extra, {})
    config = recipe_obj.train or TrainConfig()
    attach_run_log(recipe_obj.run_dir)

    async def main() -> None:
        service = await service_for(config, recipe_obj.run_dir, recipe_obj.engine)
        source = config.reward_server.reward_from or config.reward_from

        def ready(bound: int) -> None:
            console.print(f"cai reward: listening on http://{config.reward_server.host}:{bound}/get_reward "
                          f"({'constitutional reward on the engine' if source == 'judge' else 'reward model'})")

        await serve_rewards(service, on_ready=ready)
        console.print(f"cai reward: stopped after {service.stats['queries']} queries "
                      f"({service.stats['cache_hits']} from the cache)")

    anyio.run(main)
