"""The serving model, micro-batching and the query-embedding cache."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.datasets.records import ImageRecord
from model.embed import embed_records
from model.package import (
    ModelConfig,
    ModelPackageError,
    build_model,
    load_package,
    package_version,
    save_package,
)
from model.transforms import eval_transform
from serving.batching import EmbeddingCache, MicroBatcher, digest
from serving.embedder import Embedder, convolutions_on_onednn, split_transform
from serving.settings import Settings, embed_workers, torch_threads
from tests.conftest import TINY_BACKBONE

DIM = 24


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model package (random weights, GeM pooling, 24-d projection)."""
    torch.manual_seed(0)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=DIM, pooling="gem")
    directory = tmp_path_factory.mktemp("packages") / "tiny-2024-06-01"
    return save_package(build_model(config).eval(), config, directory)


@pytest.fixture(scope="module")
def embedder(package: Path) -> Embedder:
    return Embedder(package)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """JPEG files of assorted sizes and modes (colour, greyscale, portrait, landscape)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    paths = []
    for i, (width, height) in enumerate([(200, 150), (96, 240), (160, 160), (333, 101)] * 3):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        pixels[: height // 2, : width // 3] = rng.integers(0, 256, size=3)  # some structure
        image = Image.fromarray(pixels)
        if i % 4 == 3:
            image = image.convert("L")
        path = root / f"{i}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def _open(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image.copy())
    return images


# --- Embedder -------------------------------------------------------------------------------


def test_embedder_describes_its_package(embedder: Embedder, package: Path) -> None:
    assert embedder.package_dir == package
    assert embedder.version == package_version(package)
    assert embedder.version.startswith("tiny-2024-06-01-")  # folder name + weights hash
    assert embedder.dim == DIM
    assert embedder.data_config["input_size"] == [3, 160, 160]


def test_version_changes_with_the_weights(package: Path, tmp_path: Path) -> None:
    copy = tmp_path / package.name
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((package / name).read_bytes())
    assert package_version(copy) == package_version(package)
    with (copy / "model.safetensors").open("ab") as handle:
        handle.write(b" ")
    assert package_version(copy) != package_version(package)


def test_embedder_matches_batch_embedding_of_the_catalogue(
    embedder: Embedder, package: Path, photos: list[Path]
) -> None:
    """A query image lands exactly where the indexer put the same image."""
    model, config = load_package(package)
    records = [ImageRecord(path, label=i, class_key=str(i)) for i, path in enumerate(photos)]
    indexed = embed_records(model, records, config.data, batch_size=5, progress=False)
    assert indexed.skipped.size == 0

    served = embedder.embed_images(_open(photos))
    assert served.dtype == np.float32 and served.shape == (len(photos), DIM)
    np.testing.assert_allclose(served, indexed.vectors, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert np.abs(served[0] - served[1]).max() > 1e-3  # the images give different vectors

    one_by_one = np.concatenate([embedder.embed_images([image]) for image in _open(photos[:3])])
    np.testing.assert_allclose(one_by_one, served[:3], atol=1e-5)


def test_embedder_edge_cases(embedder: Embedder) -> None:
    assert embedder.embed_images([]).shape == (0, DIM)
    rgba = Image.new("RGBA", (50, 30), (10, 200, 30, 128))
    assert embedder.embed_images([rgba]).shape == (1, DIM)
    embedder.warm_up(batch_sizes=(1, 3))


def test_embedder_sets_threads(package: Path) -> None:
    before = torch.get_num_threads()
    try:
        Embedder(package, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_on_the_cpu_it_serves_a_frozen_torchscript_model(
    embedder: Embedder, package: Path, photos: list[Path]
) -> None:
    eager = Embedder(package, compile=False)
    assert embedder.runtime == "torchscript" and eager.runtime == "eager"
    images = _open(photos)
    np.testing.assert_allclose(embedder.embed_images(images), eager.embed_images(images), atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_the_frozen_model_runs_every_convolution_on_onednn(
    embedder: Embedder, package: Path, photos: list[Path]
) -> None:
    graph = embedder._model.graph
    assert graph.findAllNodes("aten::mkldnn_convolution")
    assert not graph.findAllNodes("aten::_convolution")
    eager = Embedder(package, compile=False)
    for size in (1, 2, 5):  # under 16, where PyTorch would pick another kernel for 1x1
        images = _open(photos[:size])
        np.testing.assert_allclose(
            embedder.embed_images(images), eager.embed_images(images), atol=1e-5
        )


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_convolutions_on_onednn_leaves_transposed_convolutions_alone() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),
        torch.nn.ConvTranspose2d(8, 4, 2, stride=2),
    ).eval()
    inputs = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        frozen = torch.jit.freeze(torch.jit.trace(model, inputs[:1]))
        assert convolutions_on_onednn(frozen.graph) == 2
        assert len(frozen.graph.findAllNodes("aten::_convolution")) == 1  # the transposed one
        torch.testing.assert_close(frozen(inputs), model(inputs), atol=1e-5, rtol=1e-5)


def test_prepared_inputs_embed_as_the_images_do(embedder: Embedder, photos: list[Path]) -> None:
    images = _open(photos[:3])
    prepared = [embedder.prepare(image) for image in images]
    np.testing.assert_array_equal(embedder.embed_prepared(prepared), embedder.embed_images(images))
    assert embedder.embed_prepared([]).shape == (0, DIM)


def test_prepare_runs_no_torch_and_the_batch_is_exactly_the_eval_transforms(
    embedder: Embedder, photos: list[Path]
) -> None:
    images = _open(photos)  # colour and greyscale, portrait and landscape
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        prepared = [embedder.prepare(image) for image in images]
    assert not [event.name for event in profile.events()]  # no torch operation ran
    assert all(isinstance(x, np.ndarray) and x.dtype == np.uint8 for x in prepared)
    expected = torch.stack([eval_transform(embedder.data_config)(i.convert("RGB")) for i in images])
    batch = embedder.batch_of(prepared)
    assert torch.equal(batch, expected)  # the same operations in the same order: bit for bit
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_a_transform_that_does_not_end_in_to_tensor_and_normalise_is_not_split() -> None:
    from torchvision import transforms

    normalize = transforms.Normalize((0.5,) * 3, (0.5,) * 3)
    resize = transforms.Resize(8)
    assert split_transform(transforms.Compose([resize, transforms.ToTensor(), normalize]))[1]
    assert split_transform(transforms.Compose([transforms.ToTensor(), resize, normalize])) == (
        [],
        None,
    )
    assert split_transform(transforms.Compose([resize, transforms.ToTensor()])) == ([], None)
    assert split_transform(lambda image: image) == ([], None)


@pytest.mark.parametrize(
    ("target", "why", "runtime", "atol"),
    [
        # The oneDNN rewrite fails: the frozen graph as traced still serves.
        ("serving.embedder.convolutions_on_onednn", "no rewrite", "torchscript", 1e-5),
        # Tracing fails: the eager model serves.
        ("torch.jit.trace", "data-dependent control flow", "eager", 1e-6),
    ],
)
def test_what_serves_when_a_step_of_compiling_fails(
    package: Path,
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog,
    target: str,
    why: str,
    runtime: str,
    atol: float,
) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError(why)

    monkeypatch.setattr(target, refuse)
    with caplog.at_level("WARNING", logger="serving.embedder"):
        served = Embedder(package)
    assert why in caplog.text
    assert served.runtime == runtime
    if runtime == "torchscript":
        assert not served._model.graph.findAllNodes("aten::mkldnn_convolution")
    images = _open(photos[:4])
    reference = Embedder(package, compile=False).embed_images(images)
    np.testing.assert_allclose(served.embed_images(images), reference, atol=atol)


def test_embed_workers_default_to_cores_per_torch_thread() -> None:
    cores = len(os.sched_getaffinity(0))
    assert embed_workers(Settings(threads=1)) == cores
    assert embed_workers(Settings(threads=cores)) == 1
    assert embed_workers(Settings(threads=None)) == cores  # one torch thread each by default
    assert embed_workers(Settings(device="cuda", threads=1)) == 1
    assert embed_workers(Settings(embed_workers=3)) == 3


def test_torch_threads_default_to_one_per_forward_on_the_cpu() -> None:
    assert torch_threads(Settings()) == 1
    assert torch_threads(Settings(threads=2)) == 2
    assert torch_threads(Settings(device="cuda")) is None  # torch's own default


def test_bad_package_raises_model_package_error(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match=r"no config\.json"):
        Embedder(tmp_path)


# --- MicroBatcher ---------------------------------------------------------------------------


def test_micro_batcher_batches_concurrent_requests(embedder: Embedder, photos: list[Path]) -> None:
    images = _open(photos) + _open(photos)[:8]  # 20 requests
    calls: list[int] = []
    reported: list[tuple[int, float]] = []

    def embed_fn(batch: list[Image.Image]) -> np.ndarray:
        calls.append(len(batch))
        return embedder.embed_images(batch)

    async def main() -> list[np.ndarray]:
        batcher = MicroBatcher(
            embed_fn, max_batch=8, max_wait_ms=20, on_batch=lambda n, s: reported.append((n, s))
        )
        try:
            return await asyncio.gather(*(batcher.embed(image) for image in images))
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert len(calls) < len(images) and max(calls) <= 8 and sum(calls) == len(images)
    assert [n for n, _ in reported] == calls and all(s >= 0 for _, s in reported)
    alone = np.concatenate([embedder.embed_images([image]) for image in images])
    np.testing.assert_allclose(np.stack(results), alone, atol=1e-5)


def _identity_embed(batch: list[float]) -> np.ndarray:
    return np.array([[value, 1.0] for value in batch], dtype=np.float32)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_embed_that_many_batches_at_once(workers: int) -> None:
    """Each call waits for a second one to be running: only two workers let both finish."""
    together = threading.Barrier(2, timeout=2.0)

    def embed_fn(batch: list[float]) -> np.ndarray:
        together.wait()
        return _identity_embed(batch)

    async def main() -> list:
        batcher = MicroBatcher(embed_fn, max_batch=1, max_wait_ms=0, workers=workers)
        try:
            return await asyncio.gather(
                *(batcher.embed(float(i)) for i in range(4)), return_exceptions=True
            )
        finally:
            await batcher.close()

    results = asyncio.run(main())
    if workers == 2:
        assert [row[0] for row in results] == [0.0, 1.0, 2.0, 3.0]
    else:
        assert all(isinstance(result, threading.BrokenBarrierError) for result in results)


def test_a_lone_job_runs_at_once_on_a_model_thread_while_another_stays_free() -> None:
    """run_alone: idle with two workers, the job runs on a model thread; a request arriving
    meanwhile is embedded on the other at once; with a job holding one of two threads, a
    second lone job is refused (it would take the last one), and so is any with one worker."""
    started = threading.Event()
    release = threading.Event()

    def job(value: float) -> tuple[str, float]:
        started.set()
        assert release.wait(2.0)
        return threading.current_thread().name, value

    async def main() -> tuple:
        batcher = MicroBatcher(_identity_embed, max_batch=4, max_wait_ms=0, workers=2)
        lone_batcher = MicroBatcher(_identity_embed, workers=1)
        try:
            lone = asyncio.create_task(batcher.run_alone(job, 1.0))
            await asyncio.to_thread(started.wait, 2.0)
            second = await batcher.run_alone(job, 2.0)  # one thread left: not taken
            arriving = await asyncio.wait_for(batcher.embed(5.0), 2.0)  # not behind the job
            release.set()
            one_worker = await lone_batcher.run_alone(job, 3.0)
            return await lone, second, arriving, one_worker
        finally:
            await batcher.close()
            await lone_batcher.close()

    (alone, (thread, value)), second, arriving, one_worker = asyncio.run(main())
    assert alone and value == 1.0 and thread.startswith("embed")
    assert second == (False, None)
    assert arriving.tolist() == [5.0, 1.0]
    assert one_worker == (False, None)


def test_a_lone_job_is_refused_while_requests_queue_and_its_error_reaches_the_caller() -> None:
    gate = threading.Event()

    def slow_embed(batch: list[float]) -> np.ndarray:
        assert gate.wait(2.0)
        return _identity_embed(batch)

    def failing_job() -> None:
        raise ValueError("corrupt upload")

    async def main() -> tuple:
        batcher = MicroBatcher(slow_embed, max_batch=1, max_wait_ms=0, workers=2)
        try:
            busy = [asyncio.create_task(batcher.embed(float(i))) for i in range(3)]
            await asyncio.sleep(0.05)  # two embedding, one queued
            refused = await batcher.run_alone(failing_job)
            gate.set()
            await asyncio.gather(*busy)
            with pytest.raises(ValueError, match="corrupt upload"):
                await batcher.run_alone(failing_job)
            return refused, batcher._spare
        finally:
            await batcher.close()

    refused, spare = asyncio.run(main())
    assert refused == (False, None)
    assert spare == 2  # the failed job gave its thread back


def test_lone_jobs_run_on_their_own_thread_when_given_one_and_still_take_a_turn() -> None:
    """With ``lone_executor``, run_alone's jobs run there (batches stay on the model threads),
    still count as one of the model threads' turns, and close() shuts that thread down."""
    import concurrent.futures

    lone = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed-lone")
    inside: list[int] = []

    def job() -> str:
        return threading.current_thread().name

    async def main() -> tuple:
        batcher = MicroBatcher(_identity_embed, workers=2, lone_executor=lone)

        def spare_inside() -> str:
            inside.append(batcher._spare)
            return job()

        alone, name = await batcher.run_alone(spare_inside)
        embedded = await batcher.embed(3.0)
        await batcher.close()
        return alone, name, embedded

    alone, name, embedded = asyncio.run(main())
    assert alone and name.startswith("embed-lone") and inside == [1]
    assert embedded.tolist() == [3.0, 1.0]
    with pytest.raises(RuntimeError):  # shut down with the batcher
        lone.submit(job)


def test_a_cancelled_lone_job_keeps_its_thread_until_it_ends() -> None:
    """A caller cancelled while its lone job runs (a client gone, a shutdown): the job's model
    thread counts as busy until the job has really ended, so no second lone job or batch is
    promised a thread that is still working."""
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        assert release.wait(2.0)

    async def main() -> tuple[int, int]:
        batcher = MicroBatcher(_identity_embed, workers=2)
        try:
            caller = asyncio.create_task(batcher.run_alone(job))
            await asyncio.to_thread(started.wait, 2.0)
            caller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await caller
            while_running = batcher._spare
            release.set()
            for _ in range(200):  # the job ends on its thread, then gives it back on the loop
                if batcher._spare == 2:
                    break
                await asyncio.sleep(0.01)
            return while_running, batcher._spare
        finally:
            await batcher.close()

    assert asyncio.run(main()) == (1, 2)


def test_close_waits_for_a_lone_job_whose_caller_gave_up() -> None:
    """A lone job searches the pair's collection: a rollout closes that collection after the
    batcher, so close() returns only once such a job has ended, caller cancelled or not."""
    started, release = threading.Event(), threading.Event()
    ended = threading.Event()

    def job() -> None:
        started.set()
        assert release.wait(2.0)
        ended.set()

    async def main() -> bool:
        batcher = MicroBatcher(_identity_embed, workers=2)
        caller = asyncio.create_task(batcher.run_alone(job))
        await asyncio.to_thread(started.wait, 2.0)
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # the job still runs
        release.set()
        await asyncio.wait_for(closing, 5)
        return ended.is_set()

    assert asyncio.run(main())


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(_identity_embed, workers=0)


def test_max_wait_bounds_the_latency_of_a_lone_request() -> None:
    async def main(max_wait_ms: float) -> float:
        batcher = MicroBatcher(_identity_embed, max_batch=8, max_wait_ms=max_wait_ms)
        await batcher.start()
        start = time.perf_counter()
        row = await batcher.embed(3.0)
        elapsed = time.perf_counter() - start
        await batcher.close()
        assert row.tolist() == [3.0, 1.0]
        return elapsed

    waited = asyncio.run(main(60))
    assert 0.05 <= waited < 1.0  # it waited for company, but not much longer than max_wait
    assert asyncio.run(main(0)) < 0.5


def test_a_full_batch_does_not_wait() -> None:
    async def main() -> float:
        batcher = MicroBatcher(_identity_embed, max_batch=4, max_wait_ms=10_000)
        start = time.perf_counter()
        rows = await asyncio.gather(*(batcher.embed(float(i)) for i in range(4)))
        await batcher.close()
        assert [row[0] for row in rows] == [0.0, 1.0, 2.0, 3.0]
        return time.perf_counter() - start

    assert asyncio.run(main()) < 2.0


def test_an_embedding_error_reaches_every_caller_of_the_batch() -> None:
    failing = True

    def embed_fn(batch: list[float]) -> np.ndarray:
        if failing:
            raise ValueError("model exploded")
        return _identity_embed(batch)

    async def main() -> None:
        nonlocal failing
        batcher = MicroBatcher(embed_fn, max_batch=8, max_wait_ms=20)
        results = await asyncio.gather(
            *(batcher.embed(float(i)) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, ValueError) and "exploded" in str(r) for r in results)
        failing = False  # the batcher keeps serving after a failed batch
        assert (await batcher.embed(7.0)).tolist() == [7.0, 1.0]
        await batcher.close()

    asyncio.run(main())


def test_wrong_row_count_is_an_error_for_the_batch() -> None:
    async def main() -> None:
        batcher = MicroBatcher(lambda batch: np.zeros((1, 2)), max_batch=4, max_wait_ms=20)
        results = await asyncio.gather(
            *(batcher.embed(float(i)) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) and "3 images" in str(r) for r in results)
        await batcher.close()

    asyncio.run(main())


def test_close_finishes_the_batch_in_flight_and_fails_the_queued_ones() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_embed(batch: list[float]) -> np.ndarray:
        entered.set()
        release.wait(5)
        return _identity_embed(batch)

    async def main() -> None:
        batcher = MicroBatcher(slow_embed, max_batch=2, max_wait_ms=0)
        in_flight = asyncio.create_task(batcher.embed(1.0))
        await asyncio.to_thread(entered.wait, 5)
        queued = [asyncio.create_task(batcher.embed(float(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 3
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.01)
        release.set()
        await closing
        assert (await in_flight).tolist() == [1.0, 1.0]
        for task in queued:
            with pytest.raises(RuntimeError, match="closed"):
                await task
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.embed(5.0)
        await batcher.close()  # twice is fine

    asyncio.run(main())


def test_cancelled_callers_are_left_out_of_the_batch() -> None:
    seen: list[float] = []

    def embed_fn(batch: list[float]) -> np.ndarray:
        seen.extend(batch)
        return _identity_embed(batch)

    async def main() -> None:
        batcher = MicroBatcher(embed_fn, max_batch=8, max_wait_ms=50)
        gone = asyncio.create_task(batcher.embed(1.0))
        kept = asyncio.create_task(batcher.embed(2.0))
        await asyncio.sleep(0.005)
        gone.cancel()
        assert (await kept).tolist() == [2.0, 1.0]
        await batcher.close()

    asyncio.run(main())
    assert seen == [2.0]


def test_a_failing_metrics_callback_does_not_break_serving() -> None:
    def on_batch(size: int, seconds: float) -> None:
        raise RuntimeError("metrics down")

    async def main() -> None:
        batcher = MicroBatcher(_identity_embed, max_wait_ms=0, on_batch=on_batch)
        assert (await batcher.embed(4.0)).tolist() == [4.0, 1.0]
        await batcher.close()

    asyncio.run(main())


# --- EmbeddingCache -------------------------------------------------------------------------


def test_cache_evicts_the_least_recently_used_and_counts() -> None:
    cache = EmbeddingCache(maxsize=2)
    a, b, c = (np.full(3, v, np.float32) for v in (1, 2, 3))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is not None  # "a" is now more recent than "b"
    cache.put("c", c)
    assert cache.get("b") is None
    np.testing.assert_array_equal(cache.get("a"), a)
    np.testing.assert_array_equal(cache.get("c"), c)
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)

    a[:] = 9  # the cache holds its own read-only copy
    stored = cache.get("a")
    assert stored is not None and stored[0] == 1 and not stored.flags.writeable
    cache.clear()
    assert len(cache) == 0 and cache.get("a") is None


def test_cache_of_size_zero_is_disabled() -> None:
    cache = EmbeddingCache(maxsize=0)
    cache.put("a", np.ones(2))
    assert cache.get("a") is None and len(cache) == 0 and cache.misses == 1


def test_cache_keys_are_sha256_digests_and_it_is_thread_safe() -> None:
    data = b"\xff\xd8\xff query bytes"
    assert digest(data) == hashlib.sha256(data).hexdigest()
    cache = EmbeddingCache(maxsize=50)

    def work(seed: int) -> None:
        for i in range(2000):
            key = str((seed * 7 + i) % 80)
            if cache.get(key) is None:
                cache.put(key, np.full(2, float(key)))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.hits + cache.misses == 8 * 2000 and len(cache) == 50
