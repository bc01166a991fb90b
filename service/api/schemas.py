"""Request and response bodies, one model per resource shape; the OpenAPI docs are generated from these."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


class EmbedPublic(BaseModel):
    sha256: str
    format: str = Field(description="ELF, PE, MachO for executables; PNG, JPEG, ... for images")
    model: str = Field(description="Bundle id of the model that computed the embedding")
    dim: int
    embedding: list[float]


class SearchQuery(BaseModel):
    """JSON body of ``POST /search``: a vector or the id of a stored item, never both."""

    collection: str | None = None
    vector: list[float] | None = None
    id: int | None = None
    k: int = Field(10, ge=1)
    score_threshold: float | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _one_query(self) -> SearchQuery:
        if (self.vector is None) == (self.id is None):
            raise ValueError("give exactly one of 'vector' or 'id' (or upload a file as multipart)")
        return self


class HitPublic(BaseModel):
    id: int
    score: float
    sha256: str
    name: str | None
    label: str | None


class SearchPublic(BaseModel):
    model: str
    took_ms: float
    results: list[HitPublic]


class ItemCreated(BaseModel):
    id: int
    sha256: str
    created: bool = Field(description="False when an item with the same sha256 was already there")


class ItemDeleted(BaseModel):
    id: int
    deleted: bool


class CollectionPublic(BaseModel):
    name: str
    model: str
    dim: int
    index: str
    count: int


class CollectionsPublic(BaseModel):
    collections: list[CollectionPublic]


class ErrorPublic(BaseModel):
    code: str
    message: str
