"""Service settings: environment variables with the ``VITRINE_`` prefix (or a ``.env``)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from components.catalog.image_checks import available_cpus


class Settings(BaseSettings):
    """Everything the search service reads at start-up.

    ``VITRINE_MILVUS_URI=http://milvus:19530`` points at a server; the default is the embedded
    Milvus Lite folder the nightly index step writes. The served model is the one recorded in
    the collection the alias points at, so the alias alone decides the (model, collection) pair.
    """

    model_config = SettingsConfigDict(env_prefix="VITRINE_", env_file=".env", extra="ignore")

    milvus_uri: str = Field(
        default="artifacts/milvus",
        description="a folder (embedded Milvus Lite) or http://host:19530 (a Milvus server)",
    )
    milvus_token: str = Field(default="", description="a Milvus server's token (user:password)")
    lite_process: bool = Field(
        default=True,
        description="Milvus Lite: serve each database from a child process, so its searches run "
        "beside the service's Python rather than inside it (about 1.5x the throughput under "
        "concurrent load on 2 cores); false: on threads of the service",
    )
    alias: str = Field(default="vitrine_products", description="the alias served")
    admin_token: str = Field(default="", description="token for /v1/admin; empty disables admin")
    device: str = Field(default="cpu", description="torch device: cpu, cuda, cuda:1...")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads per forward; None: 1 on the CPU (one forward per core beats "
        "forwards on all cores from 4 clients on: 129 vs 104 req/s at 16 clients on 2 cores, "
        "though a lone client waits 17.0 vs 15.2 ms; bench/bench_service.py), torch's default "
        "on a GPU",
    )
    torchscript: bool = Field(
        default=True,
        description="on the CPU, serve the model traced and frozen into TorchScript (checked "
        "against the eager model at load time); false: eager PyTorch",
    )
    max_batch: int = Field(default=16, ge=1, description="requests embedded in one forward pass")
    embed_workers: int | None = Field(
        default=None,
        ge=1,
        description="forward passes run at once; None: 1 on a GPU, else the CPU cores divided "
        "by the torch threads (2 on a 2-core machine with the default threads)",
    )
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="extra wait for a batch to fill; 0: greedy, a batch is what queued while "
        "the previous forward ran (no added latency for a lone request)",
    )
    cache_size: int = Field(default=1024, ge=0, description="recent query embeddings kept")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="largest photo")
    max_upload_pixels: int = Field(
        default=40_000_000, ge=1, description="most pixels (checked before decoding)"
    )
    default_top_k: int = Field(default=12, ge=1, description="products per answer by default")
    max_top_k: int = Field(default=100, ge=1, description="most products one request may ask")
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
    readiness_interval_s: float = Field(
        default=5.0, gt=0, description="check readiness this often for the vitrine_ready gauge"
    )


def settings_help() -> str:
    """Every setting as an environment variable, with its default and what it does (for
    ``vitrine serve --help``)."""
    lines = ["environment settings (default):"]
    for name, field in Settings.model_fields.items():
        default = "none" if field.default is None else repr(field.default)
        lines.append(f"  VITRINE_{name.upper()} ({default}): {field.description or ''}")
    return "\n".join(lines)


def torch_threads(settings: Settings) -> int | None:
    """Torch threads per forward (``threads``, or its default: 1 on the CPU, None elsewhere,
    which leaves torch's own)."""
    if settings.threads is not None:
        return settings.threads
    return 1 if settings.device.startswith("cpu") else None


def embed_workers(settings: Settings) -> int:
    """How many forward passes the service runs at once (``embed_workers``, or its default)."""
    if settings.embed_workers is not None:
        return settings.embed_workers
    if not settings.device.startswith("cpu"):
        return 1  # one accelerator runs one forward at a time anyway
    return max(1, available_cpus() // (torch_threads(settings) or 1))


@lru_cache
def get_settings() -> Settings:
    """The settings, read once; tests pass their own to ``create_app`` instead."""
    return Settings()
