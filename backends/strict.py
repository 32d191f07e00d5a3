"""The one strict pydantic base of the project's models: a key a model does not declare is an error, never ignored.

It lives on the bottom floor (``backends``) so that backend options and every config of ``cai_async`` share it;
``cai_async`` re-exports it as ``cai_async.StrictModel`` for models of one's own (a strategy's or a stage's config).
A subclass that sets other keys (``frozen=True``) writes only those: pydantic merges a subclass's ``model_config``
with its parents'."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")
