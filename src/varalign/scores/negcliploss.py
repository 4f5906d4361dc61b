"""negCLIPLoss (arXiv 2405.19547, a.k.a. s-CLIPLoss): the CLIP score minus its batch normalisation.

For a random batch b holding pair i, with Sim = F_b T_bᵀ and temperature τ:

    cs_i = Sim_ii,  R1_i = τ/2 · logsumexp_j(Sim_ij / τ),  R2_i = τ/2 · logsumexp_j(Sim_ji / τ)
    negCLIPLoss_i = cs_i − mean over K repeats of (R1_i + R2_i)

As in the reference (`cal_new_clip_score`), batches are drawn from one shard (parquet file) only,
each repeat is a fresh permutation of the shard's pool rows cut into consecutive batches of B,
and the last batch of a repeat is smaller: its rows see fewer negatives, so a smaller
log-sum-exp and a slightly higher score (REFERENCE §8.7; averaged out over K repeats).
cs does not depend on the batch, so it is computed once rather than averaged K times; nor does the
normalisation when the rows fit in one batch (a shard of at most B rows: every repeat is the same batch,
reordered), so it is computed once too — the reference's K-repeat average up to the order of float sums, K
times faster (the demo's 5,000-row shards: 12.0 -> 1.9 s at K = 10, the same subsets).

Memory: the shard's requested rows of both members stay in RAM in their stored dtype
(500k × 768 × 2 B × 2 = 1.5 GB for a DataComp L/14 shard); per batch, F_b and T_b in float32
(2 × B × D × 4 B = 200 MB at B = 32768, D = 768) plus one `row_block × B` float32 block of the
similarity (512 MiB at 4096 × 32768; 2048 gives 256 MiB for ~7% more time): never the full
B × B matrix (4 GiB). Peak ≈ stored rows + 0.75 GB for a DataComp shard at B = 32768.

On a torch device (`device="cuda"`, `"torch-cpu"`, ...: `backend.negcliploss_on`) the same per-shard
task, the same permutations and the same formulas run in `ROW_BLOCK × 32768` float32 tiles; device
memory ≈ the shard's requested rows as stored (4·N·D bytes: 192 MB for 62,500 L/14 pairs), one batch as
stored (4·B·D: 100 MB at B = 32768), two 512 MiB tiles and 40 bytes per row — linear in B and N, never
B² (one task at a time per device in a process; rows above half the GPU's free memory stay on the host
and each batch is copied instead).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from ..backend import negcliploss_on, to_float32
from ..errors import VaralignError
from ..pool import Shard, read_rows

DEFAULT_TEMPERATURE = 0.01
DEFAULT_BATCH_SIZE = 32768
DEFAULT_AVERAGE_NUM = 10
ROW_BLOCK = 4096  # rows of the batch similarity computed at once
BLOCK_ROWS = 16384  # npz rows inflated at once
_TINY = np.float32(1e-20)  # column sums below this are recomputed exactly (see _block_columns)


def negcliploss_scores(img: np.ndarray, txt: np.ndarray, *, temperature: float = DEFAULT_TEMPERATURE,
                       batch_size: int = DEFAULT_BATCH_SIZE, average_num: int = DEFAULT_AVERAGE_NUM,
                       seed: int | Sequence[int] = 0, row_block: int = ROW_BLOCK, device: str = "cpu",
                       resident: bool | None = None) -> np.ndarray:
    """negCLIPLoss of every pair (img[i], txt[i]) of in-memory `(N, D)` arrays (float16/32).

    Repeat k permutes the rows with `np.random.default_rng([*seed, k])`. On a torch `device` the same
    permutations run through `backend.negcliploss_on` (`resident`: keep the rows on the device, see there).
    """
    _check_args(img, txt, temperature, batch_size, average_num)
    n = len(img)
    seeds = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    # rows that fit in one batch are the same batch in every repeat (a permutation of all of them), so the K
    # normalisations are one number: computed once (repeat 0's order), K times less work for a small shard
    repeats = 1 if n <= batch_size else average_num
    if device != "cpu":
        perms = (np.random.default_rng([*seeds, k]).permutation(n) for k in range(repeats))
        cs, lse = negcliploss_on(np.asarray(img), np.asarray(txt), perms, temperature, batch_size, device,
                                 row_block=row_block, resident=resident)
        return (cs - lse * (temperature / 2 / repeats)).astype(np.float32)
    cs = np.empty(n, dtype=np.float64)
    norm = np.zeros(n, dtype=np.float64)
    for k in range(repeats):
        perm = np.random.default_rng([*seeds, k]).permutation(n)
        for b0 in range(0, n, batch_size):
            idx = perm[b0 : b0 + batch_size]
            f = to_float32(np.asarray(img[idx]))
            t = to_float32(np.asarray(txt[idx]))
            if k == 0:
                cs[idx] = np.einsum("ij,ij->i", f, t)
            row_lse, col_lse = batch_logsumexp(f, t, temperature, row_block)
            norm[idx] += row_lse + col_lse
    return (cs - norm * (temperature / 2 / repeats)).astype(np.float32)


def batch_logsumexp(f: np.ndarray, t: np.ndarray, temperature: float,
                    row_block: int = ROW_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise and column-wise logsumexp of (f tᵀ)/τ for one batch (float64), in row blocks.

    `f` is scaled in place by 1/τ (callers pass a fresh float32 copy).
    """
    f *= np.float32(1.0 / temperature)
    n = len(f)
    row_lse = np.empty(n, dtype=np.float64)
    col_lse = np.full(n, -np.inf, dtype=np.float64)
    for r0 in range(0, n, row_block):
        fb = f[r0 : r0 + row_block]
        s = fb @ t.T
        rmax = s.max(axis=1)
        s -= rmax[:, None]
        np.exp(s, out=s)
        row_lse[r0 : r0 + len(fb)] = rmax + np.log(s.sum(axis=1, dtype=np.float32), dtype=np.float64)
        np.logaddexp(col_lse, _block_columns(s, rmax, fb, t), out=col_lse)
    return row_lse, col_lse


def _block_columns(e: np.ndarray, rmax: np.ndarray, fb: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Column logsumexp of one row block, given e = exp(s − rmax) row-wise.

    Σ_i exp(s_ij) = exp(M) · Σ_i exp(rmax_i − M) · e_ij with M = max rmax: one GEMV, no second
    exp pass. Columns whose sum falls below 1e-20 (every entry ≥ 46 below the block max, so
    float32 underflow could bite) are recomputed exactly from their own column max.
    """
    top = rmax.max()
    csum = np.exp(rmax - top) @ e
    out = top + np.log(np.maximum(csum, _TINY), dtype=np.float64)
    low = np.flatnonzero(csum < _TINY)
    if len(low):
        sub = fb @ t[low].T
        cmax = sub.max(axis=0)
        sub -= cmax
        out[low] = cmax + np.log(np.exp(sub).sum(axis=0, dtype=np.float64))
    return out


def negcliploss_shard(shard: Shard, rows: np.ndarray, img_key: str = "l14_img", txt_key: str = "l14_txt", *,
                      temperature: float = DEFAULT_TEMPERATURE, batch_size: int = DEFAULT_BATCH_SIZE,
                      average_num: int = DEFAULT_AVERAGE_NUM, seed: int = 0,
                      block_rows: int = BLOCK_ROWS, device: str = "cpu") -> np.ndarray:
    """negCLIPLoss of the given (sorted) rows of one shard; negatives come from those rows only.

    The permutations come from `default_rng([seed, crc32(shard.name), k])`: reproducible and
    independent of which worker scores the shard or in which order.
    """
    img = read_rows(shard, img_key, rows, block_rows=block_rows)
    txt = read_rows(shard, txt_key, rows, dim=img.shape[1], block_rows=block_rows)
    return negcliploss_scores(img, txt, temperature=temperature, batch_size=batch_size, average_num=average_num,
                              seed=(seed, zlib.crc32(shard.name.encode())), device=device)


def _check_args(img: np.ndarray, txt: np.ndarray, temperature: float, batch_size: int, average_num: int) -> None:
    if img.ndim != 2 or img.shape != txt.shape:
        raise VaralignError(f"image and text embeddings must have the same (N, D) shape: {img.shape} vs {txt.shape}")
    if not temperature > 0:
        raise VaralignError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1 or average_num < 1:
        raise VaralignError(f"batch_size and average_num must be >= 1, got {batch_size} and {average_num}")
