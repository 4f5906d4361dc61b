import numpy as np
import pytest

from varalign.errors import VaralignError
from varalign.npz import iter_blocks, npz_keys, open_member, read_member
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
