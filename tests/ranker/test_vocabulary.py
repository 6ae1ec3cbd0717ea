"""The vocabulary's lookups (issue 20's loader): every path gives the indices of the one
per-value dict lookup, whatever the input's shape (few values against a large vocabulary,
dictionary-encoded columns, chunks, nulls, NUL bytes, non-ASCII, the empty string)."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from ranker.schema import LIST_PADDING, OOV_INDEX, ListFeature, Vocabulary, fixed_width


def reference(vocab: Vocabulary, values: list[str | None]) -> np.ndarray:
    return np.array([vocab.encode_one(v) for v in values], np.int32)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    rng = random.Random(0)
    values = {("é" if rng.random() < 0.1 else "") + str(rng.randrange(10 ** rng.randrange(1, 9)))
              for _ in range(20_000)}
    return Vocabulary((*sorted(values), ""))


def draws(vocab: Vocabulary, seed: int, n: int) -> list[str | None]:
    rng = random.Random(seed)
    return [rng.choice(vocab.values) if rng.random() < 0.6 else
            None if rng.random() < 0.2 else f"x{rng.randrange(10**12)}" for _ in range(n)]


@pytest.mark.parametrize("n", [0, 1, 7, 300, 2_400, 30_000])  # below and above the dict ratio
def test_every_path_gives_the_per_value_indices(vocab: Vocabulary, n: int) -> None:
    values = draws(vocab, n, n)
    want = reference(vocab, values)
    arr = pa.array(values, pa.string())
    np.testing.assert_array_equal(vocab.encode(arr), want)
    np.testing.assert_array_equal(vocab.encode(values), want)
    np.testing.assert_array_equal(vocab.encode(arr.dictionary_encode()), want)
    np.testing.assert_array_equal(vocab.encode(pa.chunked_array([arr, arr], pa.string())),
                                  np.concatenate([want, want]))
    if n > 4:  # an offset into the buffers
        np.testing.assert_array_equal(vocab.encode(arr.slice(3, n - 4)), want[3 : n - 1])


def test_a_repeated_dictionary_is_looked_up_once_and_a_new_one_again(vocab: Vocabulary) -> None:
    values = draws(vocab, 1, 500)
    first = pa.array(values, pa.string()).dictionary_encode()
    np.testing.assert_array_equal(vocab.encode(first), reference(vocab, values))
    np.testing.assert_array_equal(vocab.encode(first.slice(10)), reference(vocab, values[10:]))
    other = draws(vocab, 2, 500)
    np.testing.assert_array_equal(vocab.encode(pa.array(other).dictionary_encode()),
                                  reference(vocab, other))


def test_nul_bytes_fall_back_to_the_dict_lookup() -> None:
    vocab = Vocabulary(("a\x00", "a", *map(str, range(100))))
    assert vocab._sorted is None  # fixed-width bytes cannot tell "a" from "a\0"
    np.testing.assert_array_equal(vocab.encode(pa.array(["a\x00", "a", "b", "7"])), [1, 2, 0, 10])
    plain = Vocabulary(tuple(map(str, range(100))))
    np.testing.assert_array_equal(plain.encode(pa.array(["7\x00", "7"])), [OOV_INDEX, 8])


def test_fixed_width_pads_and_says_which_values_fit() -> None:
    keys, fits = fixed_width(pa.array(["ab", "", "abcd", None]), 3)
    assert keys.tolist() == [b"ab", b"", b"", b""] and fits.tolist() == [True, True, False, True]
    assert fixed_width(pa.array(["a\x00b"]), None) is None
    assert len(fixed_width(pa.array([], pa.string()), None)[0]) == 0


def test_a_list_column_read_as_dictionaries_encodes_as_the_plain_one() -> None:
    vocab = Vocabulary(tuple(f"i{k}" for k in range(50)))
    feature = ListFeature("history", 4, "item.item_id", vocab)
    rows = [["i1", "i2"], None, [], ["i3", "zz", None, "i49"], ["i0"]]
    plain = pa.array(rows, pa.list_(pa.string()))
    as_dict = pa.array(rows, pa.list_(pa.dictionary(pa.int32(), pa.string())))
    want = np.array([[2, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [4, 0, 0, 50], [1, 0, 0, 0]])
    assert LIST_PADDING == 0
    for column in (plain, as_dict, pa.chunked_array([plain.slice(0, 2), plain.slice(2)])):
        out, unknown = feature.encode(column, len(rows))
        np.testing.assert_array_equal(out, want)
        assert unknown == 1  # "zz"


def test_a_hashed_vocabulary_takes_a_dictionary_column_too() -> None:
    from ranker.schema import HashedVocabulary

    hashed = HashedVocabulary(1000)
    column = pa.array(["a", None, "b", "a"])
    want = hashed.encode(column)
    np.testing.assert_array_equal(hashed.encode(column.dictionary_encode()), want)
    np.testing.assert_array_equal(hashed.encode(pa.chunked_array([column.dictionary_encode()])),
                                  want)


def test_one_long_value_falls_back_instead_of_a_huge_copy(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import ranker.schema as schema

    monkeypatch.setattr(schema, "FIXED_WIDTH_MAX_BYTES", 10_000)
    vocab = Vocabulary(("x" * 5_000, *map(str, range(100))))
    assert vocab._sorted is None  # 101 x 5 000 bytes: over the limit
    np.testing.assert_array_equal(vocab.encode(pa.array(["x" * 5_000, "7", "y"])), [1, 9, 0])
