"""ObjectStore contract, run against a local folder and moto's S3 server alike."""

from __future__ import annotations

import pytest

from tasks.storage import LocalStore, PreconditionFailed, S3Store, StorageError, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "root", create=True)
    bucket = request.getfixturevalue("new_bucket")()
    return S3Store(bucket, "some/prefix", endpoint_url=request.getfixturevalue("moto_endpoint"), list_page_size=7)


def test_put_get_list_delete(store):
    for i in range(23):  # > 3 pages of 7 on S3: listing must follow every page
        store.put(f"dir/{i:03d}.jpg", bytes([i]) * (i + 1))
    store.put("other.txt", b"x")
    listed = list(store.list("dir/"))
    assert [o.key for o in listed] == [f"dir/{i:03d}.jpg" for i in range(23)]
    assert [o.size for o in listed] == list(range(1, 24))
    assert store.get("dir/005.jpg") == bytes([5]) * 6
    store.delete("dir/005.jpg")
    assert not store.exists("dir/005.jpg")
    assert len(list(store.list())) == 23


def test_etag_changes_when_bytes_change(store):
    put = store.put("a.jpg", b"one")
    first = store.head("a.jpg").etag
    assert put == first  # a plain put says what a listing will
    store.put("a.jpg", b"two!")
    assert store.head("a.jpg").etag != first


def test_conditional_put_is_compare_and_swap(store):
    etag = store.put("CURRENT", b"v1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("CURRENT", b"v1-again", if_none_match=True)
    data, seen = store.get_with_etag("CURRENT")
    assert (data, seen) == (b"v1", etag)
    store.put("CURRENT", b"v2", if_match=seen)
    with pytest.raises(PreconditionFailed):  # the ETag we read is stale now
        store.put("CURRENT", b"v3", if_match=seen)
    assert store.get("CURRENT") == b"v2"


@pytest.mark.parametrize("key", ["../escape.jpg", "a/../../escape.jpg", "/etc/passwd", "a//b.jpg", "./a.jpg", ""])
def test_keys_cannot_escape_the_root(tmp_path, key):
    store = LocalStore(tmp_path / "root", create=True)
    with pytest.raises(StorageError):
        store.put(key, b"x")
    assert not (tmp_path / "escape.jpg").exists()


def test_missing_bucket_says_what_to_do(moto_endpoint):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist.*--endpoint-url"):
        open_store("s3://no-such-bucket/x", endpoint_url=moto_endpoint)


def test_missing_local_source_says_so(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        open_store(str(tmp_path / "nope"))
    assert open_store(str(tmp_path / "made"), create=True).root.is_dir()


def test_a_large_buffer_goes_up_in_parts_without_a_copy(new_bucket, moto_endpoint):
    """A serialised index arrives as a memoryview; past the threshold it is sent as
    a multipart upload (one PUT is capped at 5 GB), read straight from the buffer."""
    import numpy as np

    mib = 1024 * 1024
    store = S3Store(new_bucket(), "cat", endpoint_url=moto_endpoint, multipart_threshold=5 * mib)
    data = np.random.default_rng(0).integers(0, 255, 12 * mib + 3, dtype=np.uint8)
    etag = store.put("indexes/v000001.faiss", memoryview(data))
    assert etag.endswith("-3")  # S3's ETag of a three-part upload: 5 + 5 + 2 MiB
    assert store.head("indexes/v000001.faiss").etag == etag
    assert store.get("indexes/v000001.faiss") == data.tobytes()
    small = store.put("CURRENT", memoryview(b"v1"), if_none_match=True)  # conditional: one PUT, as before
    assert "-" not in small and store.get("CURRENT") == b"v1"


def test_a_root_is_opened_once_per_process(tmp_path, moto_endpoint, new_bucket):
    """One store, so one boto3 client and connection pool, per root: every shard,
    reader and weights fetch in a process shares it."""
    from tasks.storage import cached_store

    bucket = new_bucket()
    s3_root = cached_store(f"s3://{bucket}/p", moto_endpoint)
    assert cached_store(f"s3://{bucket}/p", moto_endpoint) is s3_root
    assert cached_store(str(tmp_path), None) is cached_store(str(tmp_path), None)
    assert cached_store(f"s3://{bucket}/q", moto_endpoint) is not s3_root
