import secrets

import numpy as np
import pyarrow as pa
import pytest

from varalign.errors import VaralignError
from varalign.uids import (
    UID_DTYPE,
    first_duplicate,
    hex_to_uids,
    isin_sorted,
    load_subset,
    save_subset,
    sort_uids,
    uid_order,
    uids_to_hex,
)


def _reference(uids: list[str]) -> np.ndarray:
    """DataComp's conversion, one uid at a time."""
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], dtype=UID_DTYPE)


def test_hex_round_trip_matches_datacomp() -> None:
    uids = [secrets.token_hex(16) for _ in range(1000)] + ["0" * 32, "f" * 32, "0123456789abcdef" * 2]
    parsed = hex_to_uids(pa.array(uids))
    assert np.array_equal(parsed, _reference(uids))
    assert uids_to_hex(parsed).to_pylist() == uids


def test_uppercase_accepted_like_int_base16() -> None:
    upper = "ABCDEF0123456789" * 2
    assert np.array_equal(hex_to_uids([upper]), _reference([upper]))


def test_sliced_and_chunked_arrays() -> None:
    uids = [secrets.token_hex(16) for _ in range(10)]
    sliced = pa.array(["x"] + uids).slice(1)
    assert np.array_equal(hex_to_uids(sliced), _reference(uids))
    chunked = pa.chunked_array([uids[:4], uids[4:]])
    assert np.array_equal(hex_to_uids(chunked), _reference(uids))


@pytest.mark.parametrize("bad", ["abc", "g" * 32, "a" * 31, "a" * 33, "é" * 16])
def test_malformed_uid_names_row_and_source(bad: str) -> None:
    with pytest.raises(VaralignError, match=r"shard\.parquet: malformed uid .* at row 1"):
        hex_to_uids(["a" * 32, bad], "shard.parquet")


def test_saved_subset_is_sorted_like_datacomp(tmp_path) -> None:
    uids = [secrets.token_hex(16) for _ in range(500)]
    path = tmp_path / "sub" / "s.npy"
    save_subset(path, hex_to_uids(uids))
    loaded = np.load(path, allow_pickle=False)
    expected = _reference(uids)
    expected.sort()  # DataComp sorts the structured array in place: (f0, f1) lexicographic
    assert loaded.dtype == UID_DTYPE
    assert np.array_equal(loaded, expected)
    assert np.array_equal(load_subset(path), expected)


def test_load_subset_raw_memmap_and_dedupe(tmp_path) -> None:
    arr = hex_to_uids(["b" * 32, "a" * 32, "b" * 32])
    raw = tmp_path / "raw.bin"
    arr.tofile(raw)
    loaded = load_subset(raw)
    assert loaded.tolist() == sorted(set(arr.tolist()))


def test_isin_sorted_and_duplicates() -> None:
    ref = np.sort(hex_to_uids([secrets.token_hex(16) for _ in range(200)]))
    q = np.concatenate([ref[::3], hex_to_uids([secrets.token_hex(16) for _ in range(50)])])
    mask = isin_sorted(q, ref)
    assert mask[: len(ref[::3])].all() and not mask[len(ref[::3]) :].any()
    # two uids sharing the high 64 bits
    twins = hex_to_uids(["1" * 16 + "2" * 16, "1" * 16 + "3" * 16])
    assert isin_sorted(hex_to_uids(["1" * 16 + "3" * 16, "1" * 16 + "4" * 16]), twins).tolist() == [True, False]
    assert first_duplicate(np.sort(np.concatenate([twins, twins[:1]]))) == 0
    assert first_duplicate(twins) is None


@pytest.mark.parametrize("high_values", [4, 2**63])  # many equal high words / (almost surely) none
def test_uid_order_is_lexsort(high_values: int) -> None:
    """The fast path (one argsort of the high words) and its fallback order like np.lexsort."""
    rng = np.random.default_rng(high_values % 97)
    for n in (0, 1, 2, 50, 3000):
        u = np.empty(n, dtype=UID_DTYPE)
        u["f0"] = rng.integers(0, high_values, n, dtype=np.uint64)
        u["f1"] = rng.integers(0, 3, n, dtype=np.uint64)  # exact duplicates too
        then = rng.integers(0, 5, n)
        assert np.array_equal(sort_uids(u), u[np.lexsort((u["f1"], u["f0"]))])
        order = uid_order(u, then)
        ref = np.lexsort((then, u["f1"], u["f0"]))
        assert np.array_equal(u[order], u[ref]) and np.array_equal(then[order], then[ref])


def test_every_ascii_character_at_either_digit_of_a_byte() -> None:
    """Exactly the hex digits are accepted, in the first or the second digit of a byte."""
    ok = set("0123456789abcdefABCDEF")
    for pos in (0, 1, 30, 31):
        for code in range(1, 128):
            uid = "0" * pos + chr(code) + "0" * (31 - pos)
            if chr(code) in ok:
                assert np.array_equal(hex_to_uids(["1" * 32, uid]), _reference(["1" * 32, uid]))
            else:
                with pytest.raises(VaralignError, match="at row 1"):
                    hex_to_uids(["1" * 32, uid])


def test_multibyte_characters_are_not_hex_digits() -> None:
    """Lengths are checked in bytes: a 31-character uid with one 2-byte character is 32 bytes long and still
    refused at its row, as are 32 characters of which one takes 2 or 3 bytes."""
    for bad in ("\u00e9" + "0" * 30, "0" * 15 + "\u00e9" + "0" * 15, "0" * 30 + "\u00e9", "0" * 31 + "\u00e9",
                "\u20ac" + "0" * 29, "0" * 29 + "\U0001F600"):
        with pytest.raises(VaralignError, match="at row 1"):
            hex_to_uids(["1" * 32, bad])
