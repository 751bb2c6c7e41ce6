"""Serving: embedding stores (:mod:`.store`), batch embedding (``m2-embed``) and the HTTP
embedding and search service (``m2-serve``). See ``docs/serving.md``."""

from .store import EmbeddingStore, StoreError, model_identity, same_model, write_store

__all__ = ["EmbeddingStore", "StoreError", "model_identity", "same_model", "write_store"]
