"""The guard's adversarial matrix as a table: for every placement of a harmful request in a chat request and every
disguise of it (``tests/attacks.py``), plain and streamed, whether ``cai guard serve`` blocked it with a rules tier
told only the plain phrase — and the attacks it is known to miss by design (no rule names them), to show what
is left to the judge and the classifier. Prints the block rate per placement and per disguise as Markdown.

    .venv/bin/python bench/guard_attacks.py"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.attacks import DISGUISES, MISSED, PHRASE, PLACEMENTS, request_body  # noqa: E402
from tests.conftest import start_server  # noqa: E402
from tests.test_guard import proxy  # noqa: E402
from tests.test_guard_attacks import FINE, recipe  # noqa: E402


def blocked(url: str, body: dict[str, Any]) -> bool:
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    return '"content_filter"' in text


def main() -> None:
    upstream, judge = start_server(), start_server()
    judge.configure(prefer_when=FINE)
    by_placement: dict[str, list[bool]] = defaultdict(list)
    by_disguise: dict[str, list[bool]] = defaultdict(list)
    try:
        with tempfile.TemporaryDirectory() as tmp, proxy(Path(tmp), recipe(Path(tmp), upstream.base_url,
                                                                           judge.base_url)) as url:
            for placement in PLACEMENTS:
                for disguise in DISGUISES:
                    for stream in (False, True):
                        hit = blocked(url, request_body(placement, disguise, stream=stream))
                        by_placement[placement].append(hit)
                        by_disguise[disguise].append(hit)
            missed = {name: blocked(url, {"model": "m", **build(PHRASE)}) for name, build in MISSED.items()}
    finally:
        for server in (upstream, judge):
            server.process.terminate()
            server.process.wait(timeout=10)
    total = sum(len(v) for v in by_placement.values())
    print(f"{sum(sum(v) for v in by_placement.values())}/{total} requests blocked by the rules tier "
          f"({len(PLACEMENTS)} placements × {len(DISGUISES)} disguises × plain/streamed)\n")
    for title, table in (("placement", by_placement), ("disguise", by_disguise)):
        print(f"| {title} | blocked |\n|---|---|")
        for name, hits in table.items():
            print(f"| {name} | {sum(hits)}/{len(hits)} |")
        print()
    print("| not caught by rules (by design) | blocked by rules |\n|---|---|")
    for name, hit in missed.items():
        print(f"| {name} | {'yes' if hit else 'no'} |")


if __name__ == "__main__":
    main()
