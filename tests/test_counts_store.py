"""The HDF5 counts file: schema, attributes, row sums, batch-size independence, committed rows only,
refusals (existing output, mismatched resume, second writer) that leave existing files unchanged."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from data_gen.generate import generate_counts
from data_gen.store import FORMAT_VERSION, CountsWriter, ResumeMismatchError, StoreLockedError, read_counts
from surrogate_cert.core.errors import StoreError
from surrogate_cert.core.hashing import sha256_file

ATTRS = (
    "format_version",
    "sigma",
    "n",
    "n0",
    "num_classes",
    "seed",
    "dataset",
    "split",
    "model_sha256",
    "package_version",
    "input_shape",
    "complete",
    "rows",
)


@pytest.fixture(scope="module")
def two_batch_sizes(tmp_path_factory, digits_untrained_model):
    folder = tmp_path_factory.mktemp("store")
    paths = []
    for batch_size in (1000, 47):
        path = folder / f"cal-{batch_size}.h5"
        generate_counts(
            "digits",
            "cal",
            digits_untrained_model,
            0.5,
            150,
            str(path),
            n0=30,
            batch_size=batch_size,
            seed=1,
            limit=25,
            device="cpu",
            progress=False,
        )
        paths.append(path)
    return paths


def test_counts_identical_for_two_batch_sizes(two_batch_sizes):
    a, b = (read_counts(p) for p in two_batch_sizes)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.counts_select, b.counts_select)


def test_rows_sum_to_n_and_attributes_present(two_batch_sizes, digits_untrained_model):
    counts = read_counts(two_batch_sizes[0])
    assert counts.counts.shape == (25, 10) and counts.counts.dtype == np.int64
    assert (counts.counts.sum(axis=1) == 150).all() and (counts.counts_select.sum(axis=1) == 30).all()
    assert set(ATTRS) <= set(counts.attrs)
    assert counts.attrs["format_version"] == FORMAT_VERSION and counts.attrs["complete"] is True
    assert counts.attrs["rows"] == 25 and counts.attrs["input_shape"] == [1, 8, 8]
    assert counts.attrs["model_sha256"] == sha256_file(digits_untrained_model)
    assert (counts.attrs["sigma"], counts.attrs["n"], counts.attrs["n0"], counts.attrs["seed"]) == (0.5, 150, 30, 1)
    assert (counts.attrs["dataset"], counts.attrs["split"], counts.attrs["num_classes"]) == ("digits", "cal", 10)


def test_schema_is_chunked_compressed_and_checksummed(two_batch_sizes):
    with h5py.File(two_batch_sizes[0], "r") as h5:
        for name in ("indices", "labels", "counts", "counts_select"):
            ds = h5[name]
            assert ds.chunks is not None and ds.compression == "gzip" and ds.fletcher32, name
        assert h5["counts"].dtype.kind == "u"


def test_only_committed_rows_are_read(tmp_path):
    path = tmp_path / "partial.h5"
    attrs = {
        "sigma": 0.25,
        "n": 10,
        "n0": 0,
        "num_classes": 3,
        "seed": 0,
        "dataset": "npz:x",
        "split": "test",
        "limit": None,
        "model_sha256": "0" * 64,
        "noise_scheme": "s",
        "device_type": "cpu",
        "amp": None,
        "input_shape": [1, 2, 2],
        "package_version": "0",
    }
    indices, labels = np.arange(10, 15), np.array([0, 1, 2, 0, 1])
    with CountsWriter.open(path, indices=indices, labels=labels, attrs=attrs) as writer:
        writer.append(np.array([[10, 0, 0], [0, 10, 0]]))
        with pytest.raises(StoreLockedError, match="another process"):
            CountsWriter.open(path, indices=indices, labels=labels, attrs=attrs, resume=True)
    partial = read_counts(path)
    assert partial.indices.tolist() == [10, 11] and partial.labels.tolist() == [0, 1]
    assert partial.counts.tolist() == [[10, 0, 0], [0, 10, 0]] and partial.counts_select is None
    assert partial.attrs["complete"] is False and partial.attrs["limit"] is None
    with CountsWriter.open(path, indices=indices, labels=labels, attrs=attrs, resume=True) as writer:
        assert writer.committed == 2
        writer.append(np.full((3, 3), [3, 3, 4]))
    assert read_counts(path).attrs["complete"] is True and len(read_counts(path)) == 5


def test_existing_output_and_mismatched_resume_refused_unchanged(two_batch_sizes, digits_untrained_model):
    path = two_batch_sizes[1]
    before = sha256_file(path)
    kwargs = dict(n0=30, seed=1, limit=25, device="cpu", progress=False)
    with pytest.raises(StoreError, match="already exists; pass --resume"):
        generate_counts("digits", "cal", digits_untrained_model, 0.5, 150, str(path), **kwargs)
    with pytest.raises(ResumeMismatchError, match="sigma 0.5 in the file vs 0.25 requested"):
        generate_counts("digits", "cal", digits_untrained_model, 0.25, 150, str(path), resume=True, **kwargs)
    with pytest.raises(StoreError, match="n 150 in the file vs 151"):
        generate_counts("digits", "cal", digits_untrained_model, 0.5, 151, str(path), resume=True, **kwargs)
    with pytest.raises(StoreError, match="split 'cal' in the file vs 'test'"):
        generate_counts("digits", "test", digits_untrained_model, 0.5, 150, str(path), resume=True, **kwargs)
    assert sha256_file(path) == before
    # Resuming a complete file with the same settings is a no-op that succeeds.
    generate_counts("digits", "cal", digits_untrained_model, 0.5, 150, str(path), resume=True, **kwargs)
    assert sha256_file(path) == before


def test_read_counts_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        read_counts(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match="is a text file, not an HDF5 counts file"):
        read_counts(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["counts"] = np.zeros((2, 2))
    with pytest.raises(StoreError, match="not a surrogate-cert counts file"):
        read_counts(tmp_path / "other.h5")
