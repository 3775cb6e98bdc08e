"""One Block2 block of ``GET fw/<sha256>``: what it cost before and what it costs now.

Run: .venv/bin/python -m pytest bench/test_bench_firmware_block.py --benchmark-enable
--benchmark-only -q

A product with 20 firmware versions and one 656 KB application, on a real SQLite file and
blob directory. The old path (issue 13, finding 5) served every block by listing the
product's firmware and the platform's Device OS modules, then reading and SHA-256-hashing
the whole file to slice out 1 KiB: a 656-block download hashed ~430 MB. The new path
decides once per session whether the device may fetch the image (one indexed query,
``downloadable_size``, timed on its own) and reads only the block's bytes
(``BlobStore.read_range``). Same group, so the table shows the ratio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from otacore.coap import block_slice
from otacore.module import build_module
from otacore.platforms import ModuleFunction
from server.store import Store

PLATFORM = 13
IMAGE_SIZE = 656 * 1024
BLOCK = 1024
SZX = 6  # 1024-byte blocks


def _image(version: int, size: int) -> bytes:
    body = hashlib.shake_256(f"bench block {version}".encode()).digest(size - 72)
    return build_module(body, platform_id=PLATFORM, function=ModuleFunction.USER_PART,
                        index=1, version=6, product_id=PLATFORM, product_version=version)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, int, str]]:
    """A store with a product of 20 firmware versions; the newest is a 656 KB image."""
    store = Store.open_dir(Path(tmp_path_factory.mktemp("block")), pool_size=2)
    with store.write() as tx:
        product = tx.insert_product(slug="b", name="B", platform_id=PLATFORM,
                                    description="", now=1)
    sha256 = ""
    for version in range(1, 21):
        image = _image(version, IMAGE_SIZE if version == 20 else 4096)
        sha256 = store.blobs.put(image)
        with store.write() as tx:
            tx.insert_firmware(
                product_id=product.id, version=version, title=f"v{version}", description="",
                filename="f.bin", size=len(image), sha256=sha256, platform_id=PLATFORM,
                module_function=ModuleFunction.USER_PART, module_index=1, module_version=6,
                module_info={}, uploaded_by="bench", uploaded_at=1)
    yield store, product.id, sha256
    store.close()


def _old_block(store: Store, product_id: int, sha256: str, num: int) -> bytes:
    """What ``_serve_firmware_block`` did per block before the fix (blob_for_product)."""
    with store.read() as tx:
        allowed = any(fw.sha256 == sha256 for fw in tx.list_firmware(product_id))
        if not allowed:
            allowed = any(m["sha256"] == sha256 for m in tx.list_system_modules(PLATFORM))
    image = store.blobs.get(sha256)  # the whole file, hashed
    return block_slice(image, num, SZX)[0]


def _new_block(store: Store, sha256: str, num: int) -> bytes:
    """A block now: the session decided the authorisation once; read the block only."""
    return store.blobs.read_range(sha256, num * BLOCK, BLOCK)


@pytest.mark.benchmark(group="fw-block-1KiB-of-656KB")
def test_old_block_lists_firmware_reads_and_hashes_the_file(benchmark, stored) -> None:  # type: ignore[no-untyped-def]
    store, product_id, sha256 = stored
    data = benchmark(_old_block, store, product_id, sha256, 300)
    assert len(data) == BLOCK


@pytest.mark.benchmark(group="fw-block-1KiB-of-656KB")
def test_new_block_reads_the_block(benchmark, stored) -> None:  # type: ignore[no-untyped-def]
    store, _, sha256 = stored
    data = benchmark(_new_block, store, sha256, 300)
    assert data == _old_block(*stored, 300)


@pytest.mark.benchmark(group="fw-session-authorisation")
def test_new_authorisation_once_per_session(benchmark, stored) -> None:  # type: ignore[no-untyped-def]
    store, product_id, sha256 = stored

    def decide() -> int | None:
        with store.read() as tx:
            return tx.downloadable_size(product_id, PLATFORM, sha256)

    assert benchmark(decide) == store.blobs.path_of(sha256).stat().st_size
