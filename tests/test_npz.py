import numpy as np
import pytest

from varalign.errors import VaralignError
from varalign.npz import iter_blocks, load_npy, load_npz, npz_keys, open_member, read_member
from varalign.synth import write_npz


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("block_rows", [1, 7, 1000, 5000])
def test_blocks_reassemble_member(tmp_path, compressed, block_rows) -> None:
    rng = np.random.default_rng(0)
    arrays = {"l14_img": rng.standard_normal((1001, 24)).astype(np.float16), "b32_img": np.ones((1001, 3))}
    path = tmp_path / "x.npz"
    if compressed:
        np.savez_compressed(path, **arrays)
    else:
        np.savez(path, **arrays)
    member = open_member(path, "l14_img")
    assert member.shape == (1001, 24) and member.dtype == np.float16 and member.compressed == compressed
    blocks = list(iter_blocks(member, block_rows))
    assert all(len(b) <= block_rows for b in blocks)
    assert np.array_equal(np.concatenate(blocks), arrays["l14_img"])
    assert np.array_equal(read_member(member), arrays["l14_img"])
    assert sorted(npz_keys(path)) == ["b32_img", "l14_img"]


def test_fortran_order_member(tmp_path) -> None:
    arr = np.asfortranarray(np.arange(60, dtype=np.float32).reshape(12, 5))
    write_npz(tmp_path / "f.npz", {"l14_img": arr})
    blocks = list(iter_blocks(open_member(tmp_path / "f.npz", "l14_img"), 5))
    assert np.array_equal(np.concatenate(blocks), arr)


@pytest.mark.filterwarnings("ignore:Stored array in format 2.0")
def test_oversized_header_refused_like_np_load(tmp_path) -> None:
    arr = np.zeros((3,), dtype=[(f"field_{i:04d}", "f4") for i in range(4000)])  # header > 64 KiB → v2
    np.savez_compressed(tmp_path / "h.npz", l14_img=arr)
    with pytest.raises(VaralignError, match=r"h\.npz: npz member 'l14_img' is not a valid .npy array"):
        open_member(tmp_path / "h.npz", "l14_img")


def test_object_member_refused(tmp_path) -> None:
    np.savez(tmp_path / "o.npz", l14_img=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(VaralignError, match="pickle"):
        open_member(tmp_path / "o.npz", "l14_img")


@pytest.mark.parametrize("compressed", [True, False])
def test_reused_buffer_blocks_are_the_same_rows(tmp_path, compressed) -> None:
    """reuse=True: each block is a view of one buffer, overwritten by the next; copied as they come,
    the blocks are the member's rows (also the short last block)."""
    arr = np.random.default_rng(1).standard_normal((1003, 16)).astype(np.float16)
    path = tmp_path / "r.npz"
    (np.savez_compressed if compressed else np.savez)(path, l14_img=arr)
    member = open_member(path, "l14_img")
    blocks = []
    bases = set()
    for block in iter_blocks(member, 100, reuse=True):
        bases.add(block.__array_interface__["data"][0])
        blocks.append(block.copy())
    assert len(bases) == 1  # one buffer for all 11 blocks
    assert [len(b) for b in blocks] == [100] * 10 + [3]
    assert np.array_equal(np.concatenate(blocks), arr)


def test_stored_member_checks_its_crc(tmp_path) -> None:
    """An uncompressed member is read straight into the blocks; a flipped byte still fails the CRC."""
    arr = np.arange(4000, dtype=np.float16).reshape(500, 8)
    path = tmp_path / "s.npz"
    np.savez(path, l14_img=arr)
    member = open_member(path, "l14_img")
    data = bytearray(path.read_bytes())
    data[member.data_offset + member.header_len + 3000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VaralignError, match=r"s\.npz: corrupt npz: member 'l14_img' fails its CRC check"):
        for _ in iter_blocks(member, 64, reuse=True):
            pass


ARRAYS = {  # what varalign reads through load_npy / load_npz: work-directory state, subsets, centroids, indexes
    "f16": np.random.default_rng(2).standard_normal((37, 5)).astype(np.float16),
    "fortran": np.asfortranarray(np.arange(24, dtype=np.float64).reshape(4, 6)),
    "big_endian": np.arange(10, dtype=">i4"),
    "uids": np.array([(1, 2), (3, 4)], dtype="u8,u8"),
    "text": np.array(["a", "shard-0001"]),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 7), dtype=np.float32),
    "bools": np.array([True, False, True]),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_load_npy_equals_np_load(tmp_path, name) -> None:
    arr = ARRAYS[name]
    path = tmp_path / "a.npy"
    np.save(path, arr)
    for mmap_mode in (None, "r", "c"):
        got, want = load_npy(path, mmap_mode=mmap_mode), np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.f_contiguous == want.flags.f_contiguous
    with open(path, "rb") as fh:  # a file object (a subset read from a URL)
        assert np.array_equal(load_npy(fh), arr)


def test_load_npy_mapped_copy_on_write_leaves_the_file(tmp_path) -> None:
    np.save(tmp_path / "a.npy", np.arange(5))
    arr = load_npy(tmp_path / "a.npy", mmap_mode="c")
    arr[0] = 99
    assert load_npy(tmp_path / "a.npy")[0] == 0


def test_load_npy_refuses_objects_and_short_files(tmp_path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_npy(tmp_path / "o.npy")
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_npy(tmp_path / "o.npy", mmap_mode="r")
    np.save(tmp_path / "t.npy", np.arange(100))
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-8])
    with pytest.raises(ValueError, match="cut short: 792 of 800"):
        load_npy(tmp_path / "t.npy")
    (tmp_path / "n.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError):
        load_npy(tmp_path / "n.npy")


@pytest.mark.parametrize("compressed", [True, False])
def test_load_npz_equals_np_load(tmp_path, compressed) -> None:
    path = tmp_path / "a.npz"
    (np.savez_compressed if compressed else np.savez)(path, **ARRAYS)
    got = load_npz(path)
    with np.load(path, allow_pickle=False) as want:
        assert sorted(got) == sorted(want.files)
        for key in want.files:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key])
    assert list(load_npz(path, ["uids", "text"])) == ["uids", "text"]
    with pytest.raises(KeyError, match="nope"):
        load_npz(path, ["uids", "nope"])


def test_load_npz_from_many_threads(tmp_path) -> None:
    """Task threads read work-directory files at once; every header goes through one lock (CPython 3.11's
    ast.literal_eval, which numpy's header parser uses, can fail when threads parse at the same time)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(16):
        paths.append(tmp_path / f"{i}.npz")
        np.savez(paths[-1], **{f"k{j}": np.full((3, j + 1), i, dtype=np.int32) for j in range(20)})
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(load_npz, paths * 8))
    for i, arrays in enumerate(results):
        assert len(arrays) == 20 and all((a == i % 16).all() and a.shape == (3, j + 1)
                                         for j, a in enumerate(arrays.values()))
