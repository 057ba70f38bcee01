"""Service settings: environment variables with the ``VITRINE_`` prefix (or a ``.env``)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the search service reads at start-up.

    ``VITRINE_MILVUS_URI=http://milvus:19530`` points at a server; the default is the embedded
    Milvus Lite folder the nightly index step writes. The served model is the one recorded in
    the collection the alias points at, so the alias alone decides the (model, collection) pair.
    """

    model_config = SettingsConfigDict(env_prefix="VITRINE_", env_file=".env", extra="ignore")

    milvus_uri: str = "artifacts/milvus"
    milvus_token: str = ""
    alias: str = "vitrine_products"
    admin_token: str = Field(default="", description="token for /v1/admin; empty disables admin")
    device: str = "cpu"
    threads: int | None = Field(default=None, description="torch threads; None: torch's default")
    max_batch: int = Field(default=16, ge=1, description="requests embedded in one forward pass")
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="extra wait for a batch to fill; 0: greedy, a batch is what queued while "
        "the previous forward ran (no added latency for a lone request)",
    )
    cache_size: int = Field(default=1024, ge=0, description="recent query embeddings kept")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_upload_pixels: int = Field(default=40_000_000, ge=1)
    default_top_k: int = Field(default=12, ge=1)
    max_top_k: int = Field(default=100, ge=1)
    upload_dir: str = Field(
        default="artifacts/uploads", description="where photos added through the admin API go"
    )
    canary_interval_s: float = Field(
        default=300.0, ge=0, description="run the recall canary this often; 0: only on demand"
    )
    canary_tolerance: float = Field(
        default=0.05, ge=0, le=1, description="live canary recall@10 below expected - this alerts"
    )
    reload_interval_s: float = Field(
        default=5.0, gt=0, description="while nothing is served, retry loading this often"
    )


@lru_cache
def get_settings() -> Settings:
    """The settings, read once; tests pass their own to ``create_app`` instead."""
    return Settings()
