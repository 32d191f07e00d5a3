"""MkDocs hooks (mkdocs.yml: ``hooks``): the generated pages of :mod:`cai_async.docs_gen` are added to the site
when it is built — the configuration reference, the CLI reference, and on the "How it works" page the floors of the
rooms and which room imports which — so they are always the code's. Nothing is written into docs/."""

from __future__ import annotations

from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from cai_async import docs_gen

GENERATED = {"<!-- generated: room-imports -->": docs_gen.room_imports, "<!-- generated: floors -->": docs_gen.floors}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the reference pages, generated now."""
    pages = {"reference/configuration.md": docs_gen.config_reference, "reference/cli.md": docs_gen.cli_reference}
    for path, make in pages.items():
        files.append(File.generated(config, path, content=make()))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files, **_: Any) -> str:
    """Fill in the generated tables a page asks for."""
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
