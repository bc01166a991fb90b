"""Typed errors of the vector store. Every message says what went wrong and what to do about it.

Re-exported by `service.store`. The REST layer maps them to status codes: CollectionNotFound 404,
InvalidInput (and DimensionMismatch) 400/422, ModelMismatch/ConfigMismatch/CollectionExists 409,
WriterBusy 503, StoreCorrupt 500.
"""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """Base class of every error raised by the vector store."""


class CollectionNotFound(StoreError, LookupError):
    """The named collection does not exist in this store."""


class CollectionExists(StoreError):
    """`create_collection` was asked for a name that is already taken (by the same model)."""


class ModelMismatch(StoreError):
    """The caller's model id differs from the collection's: a collection never mixes two models' vectors."""


class ConfigMismatch(StoreError):
    """The caller asked for an index kind or metric that differs from the existing collection's."""


class UnsupportedOperation(StoreError):
    """The collection's FAISS index kind cannot do what was asked (e.g. ID-filtered search on some kinds)."""


class InvalidInput(StoreError, ValueError):
    """An argument is malformed: a bad collection name, sha256, k, factory string or vector."""


class DimensionMismatch(InvalidInput):
    """A vector or query batch does not have the collection's dimension."""


class WriterBusy(StoreError):
    """Another writer held the collection's write lock for longer than the configured timeout."""


class StoreCorrupt(StoreError):
    """A collection's SQLite file (the source of truth) is unreadable. The FAISS snapshot never raises this:
    a bad snapshot is rebuilt from SQLite."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"{path} is corrupt or not a lookalike collection database ({detail}). It is the "
            f"collection's source of truth and cannot be rebuilt from the FAISS index: restore it from a "
            f"backup, or remove the directory {path.parent} and index the collection again."
        )
