"""Tests for swarm.data: the stdlib corpus, file/folder corpora, the by-file split and the samplers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from swarm.data import BatchSampler, default_corpus_root, is_val_file, load_corpus, validation_batches

EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idlelib"}


@pytest.fixture(scope="module")
def stdlib_corpus():
    t0 = time.perf_counter()
    corpus = load_corpus()
    elapsed = time.perf_counter() - t0
    return corpus, elapsed


def test_default_corpus_loads(stdlib_corpus):
    corpus, elapsed = stdlib_corpus
    assert elapsed < 10.0  # budget is 3 s; generous margin for a loaded shared machine
    root = default_corpus_root()
    assert corpus.source == f"python-stdlib:{root}"
    assert corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8
    assert corpus.train.ndim == 1 and corpus.val.ndim == 1
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000
    assert len(corpus.train) + len(corpus.val) <= 16 * 2**20
    assert corpus.n_files_train == len(corpus.train_files) > 100
    assert corpus.n_files_val == len(corpus.val_files) > 0
    # it is Python source
    text = corpus.train[:200_000].tobytes()
    assert b"def " in text and b"import " in text
    # the first train file starts the train stream
    first = (root / corpus.train_files[0]).read_bytes()
    assert corpus.train[: len(first)].tobytes() == first


def test_default_corpus_split_is_by_file_and_filtered(stdlib_corpus):
    corpus, _ = stdlib_corpus
    train, val = set(corpus.train_files), set(corpus.val_files)
    assert not train & val
    for rel in train | val:
        assert rel.endswith(".py")
        assert not EXCLUDED & set(Path(rel).parts[:-1]), rel
    assert all(is_val_file(r, 0.05) for r in val)
    assert not any(is_val_file(r, 0.05) for r in train)
    assert list(corpus.train_files) == sorted(corpus.train_files)


def test_default_corpus_deterministic(stdlib_corpus):
    corpus, _ = stdlib_corpus
    again = load_corpus()
    assert np.array_equal(corpus.train, again.train)
    assert np.array_equal(corpus.val, again.val)
    assert corpus.train_files == again.train_files and corpus.val_files == again.val_files


def test_max_bytes_caps_each_part():
    corpus = load_corpus(max_bytes=200_000, val_fraction=0.1)
    assert len(corpus.train) == 180_000
    assert len(corpus.val) == 20_000
    full = load_corpus(val_fraction=0.1)
    # the cap takes a prefix of each part (files in sorted order) and never moves files across the split
    assert np.array_equal(corpus.train, full.train[:180_000])
    assert np.array_equal(corpus.val, full.val[:20_000])
    assert corpus.n_files_train < full.n_files_train


def test_is_val_file_rule():
    import hashlib

    rel = "json/decoder.py"
    u = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 2**32
    assert is_val_file(rel, u + 1e-9) and not is_val_file(rel, u)


# ----------------------------------------------------------------------------------------------- user corpora


def test_text_file_corpus(tmp_path):
    data = bytes(range(256)) * 40  # 10240 bytes
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    corpus = load_corpus(path, val_fraction=0.1, max_bytes=None)
    assert corpus.n_files_train == corpus.n_files_val == 1
    assert corpus.source == str(path.resolve())
    assert len(corpus.val) == 1024
    assert corpus.train.tobytes() + corpus.val.tobytes() == data
    capped = load_corpus(str(path), val_fraction=0.1, max_bytes=1000)
    assert capped.train.tobytes() == data[:900] and capped.val.tobytes() == data[-1024:][:100]


def test_folder_corpus(tmp_path, monkeypatch):
    files = {
        "a.py": b"print('a')\n",
        "sub/b.md": b"# title\n",
        "sub/deeper/c.txt": b"hello world\n" * 10,
        "z.rst": b"zz\n",
        "image.bin": b"\x00\x01\x02",  # wrong suffix: ignored because text files exist
        "empty.txt": b"",  # empty: skipped
        ".git/objects/x.json": b"{}",  # VCS internals: skipped
    }
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    corpus = load_corpus(tmp_path, val_fraction=0.3)
    used = set(corpus.train_files) | set(corpus.val_files)
    assert used == {"a.py", "sub/b.md", "sub/deeper/c.txt", "z.rst"}
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert corpus.n_files_train + corpus.n_files_val == 4 and corpus.n_files_val >= 1
    monkeypatch.chdir(tmp_path)  # a relative path gives the same corpus
    assert load_corpus(".", val_fraction=0.3).train_files == corpus.train_files
    for part, names in ((corpus.train, corpus.train_files), (corpus.val, corpus.val_files)):
        assert part.tobytes() == b"\n".join(files[n] for n in names)
    assert load_corpus(tmp_path, val_fraction=0.3).val_files == corpus.val_files


def test_folder_val_fallback_takes_last_file(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_bytes(name.encode() * 20)
    tiny_fraction = 1e-9  # no file hashes below this
    corpus = load_corpus(tmp_path, val_fraction=tiny_fraction, max_bytes=None)
    assert corpus.val_files == ("c.txt",) and corpus.train_files == ("a.txt", "b.txt")
    assert corpus.val.tobytes() == b"c.txt" * 20
    # and symmetrically, if every file hashes into validation the first one is kept for training
    corpus = load_corpus(tmp_path, val_fraction=1 - 1e-12, max_bytes=None)
    assert corpus.train_files == ("a.txt",) and corpus.val_files == ("b.txt", "c.txt")


def test_folder_without_text_suffix_uses_all_files(tmp_path):
    (tmp_path / "one.dat").write_bytes(b"x" * 100)
    (tmp_path / "two").write_bytes(b"y" * 100)
    corpus = load_corpus(tmp_path, val_fraction=0.5, max_bytes=None)
    assert set(corpus.train_files) | set(corpus.val_files) == {"one.dat", "two"}


def test_single_file_folder_splits_bytes(tmp_path):
    (tmp_path / "only.txt").write_bytes(b"abcdefghij" * 10)
    corpus = load_corpus(tmp_path, val_fraction=0.2)
    assert len(corpus.train) == 80 and len(corpus.val) == 20


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(tmp_path)  # empty folder
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(tmp_path / "empty.txt")
    with pytest.raises(ValueError):
        load_corpus(val_fraction=0.0)


# ---------------------------------------------------------------------------------------------------- samplers


def test_sampler_batches():
    data = np.arange(1000, dtype=np.int64) % 256
    data = data.astype(np.uint8)
    s = BatchSampler(data, batch_size=8, seq_len=16, seed=0)
    x, y = s.sample()
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        # windows are contiguous slices of the data, y shifted by one
        start = int(np.flatnonzero(data == row_x[0].item())[0])
        assert np.array_equal(row_x.numpy(), data[start : start + 16])
        assert np.array_equal(row_y.numpy(), data[start + 1 : start + 17])


def test_sampler_deterministic_per_seed():
    data = np.random.default_rng(0).integers(0, 256, size=5000).astype(np.uint8)
    a = [BatchSampler(data, 4, 32, seed=1).sample() for _ in range(2)]
    s1, s2, s3 = (BatchSampler(data, 4, 32, seed=k) for k in (1, 1, 2))
    seq1 = [s1.sample() for _ in range(3)]
    seq2 = [s2.sample() for _ in range(3)]
    seq3 = [s3.sample() for _ in range(3)]
    assert torch.equal(a[0][0], a[1][0])
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(seq1, seq2))
    assert not torch.equal(seq1[0][0], seq3[0][0])
    assert not torch.equal(seq1[0][0], seq1[1][0])  # successive batches differ


def test_sampler_state_dict_round_trip():
    data = np.random.default_rng(1).integers(0, 256, size=5000).astype(np.uint8)
    s = BatchSampler(data, 4, 32, seed=3)
    for _ in range(5):
        s.sample()
    state = s.state_dict()
    expected = s.sample()
    after = s.sample()
    resumed = BatchSampler(data, 4, 32, seed=999)
    resumed.load_state_dict(state)
    got = resumed.sample()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(resumed.sample()[0], after[0])
    assert resumed.n_sampled == s.n_sampled == 7
    with pytest.raises(ValueError):
        BatchSampler(data, 8, 32, seed=0).load_state_dict(state)


def test_sampler_short_data():
    with pytest.raises(ValueError):
        BatchSampler(np.zeros(16, dtype=np.uint8), 2, 16, seed=0)
    s = BatchSampler(np.arange(17, dtype=np.uint8), 3, 16, seed=0)  # exactly seq_len + 1: one window
    x, y = s.sample()
    assert torch.equal(x, torch.arange(16).expand(3, 16)) and torch.equal(y, torch.arange(1, 17).expand(3, 16))


def test_validation_batches():
    data = np.arange(10_000, dtype=np.int64)  # token value == position, so windows reveal their offsets
    batches = validation_batches(data, batch_size=4, seq_len=32, n_batches=3)
    again = validation_batches(data, batch_size=4, seq_len=32, n_batches=3)
    assert len(batches) == 3
    for (x, y), (x2, y2) in zip(batches, again):
        assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x + 1, y)
    starts = torch.cat([x[:, 0] for x, _ in batches]).numpy()
    # evenly spaced from the first possible window to the last one
    assert starts[0] == 0 and starts[-1] == 10_000 - 33
    assert np.abs(np.diff(starts) - (10_000 - 33) / 11).max() <= 1
    with pytest.raises(ValueError):
        validation_batches(data[:32], 1, 32, 1)
