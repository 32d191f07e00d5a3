"""``python -m cai_async.cli`` (what ``accelerate launch -m cai_async.cli ...`` runs)."""

from cai_async.cli import main

main()
