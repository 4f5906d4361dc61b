"""VAS-D ∩ CLIP score: VAS against the selection itself, refined by greedy backward elimination.

A Selector: one pass over the pool's embeddings (the Gram of the pool and of the candidates, and the
candidates copied into an on-disk store), then `num_iters` rounds over the store (kernels in
`scores/vas_d.py`). Exact by default; `mode = "lowrank"` runs the rounds in the top-r eigenspace
of the candidates.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from ..errors import VaralignError
from ..pool import ARCHS, image_key
from ..recipe import Stage
from ..scores.vas_d import (
    CandidateStore,
    VasDResult,
    collect_shard,
    lowrank_basis,
    project_store,
    vas_d_iterate,
    write_rows,
)
from ..select import count_for_fraction
from .base import (
    Method,
    RunSettings,
    Selector,
    arch_param,
    check_arch,
    check_fractions_shrink,
    name,
    param,
    register,
    stage_params,
)
from .clip_score import clip_stage

DEFAULT_RANK = 128


@dataclass
class VasDParams:
    arch: str | None = arch_param()
    num_iters: int | None = param(None, help="VAS-D rounds (required, as in the reference)", type=int, low=1)
    mode: str = param("exact", flag="vas_d_mode", choices=("exact", "lowrank"), type=str,
                      help="exact (default, the reference algorithm) or lowrank: every round in the top-r "
                           "eigenspace of the candidates (much faster; agreement measured in the README)")
    rank: int = param(DEFAULT_RANK, flag="vas_d_rank", type=int, low=1, help="rank r of --vas_d_mode lowrank")


class VasD(Selector):
    def __init__(self, p: VasDParams, run: RunSettings) -> None:
        arch = check_arch(p.arch, "vas_d")
        if not isinstance(p.num_iters, int) or p.num_iters < 1:
            raise VaralignError("vas_d needs --num_iters >= 1")
        if p.mode not in ("exact", "lowrank"):
            raise VaralignError(f"vas_d mode must be 'exact' or 'lowrank', got {p.mode!r}")
        if p.mode == "lowrank" and not (isinstance(p.rank, int) and 1 <= p.rank <= ARCHS[arch]):
            raise VaralignError(f"vas_d rank must be an integer in [1, {ARCHS[arch]}], got {p.rank!r}")
        self.p, self.key, self.dim, self.device = p, image_key(arch), ARCHS[arch], run.device
        self.members = [(self.key, self.dim)]
        self.info = {"num_iters": p.num_iters, "mode": p.mode} | ({"rank": p.rank} if p.mode == "lowrank" else {})

    def select(self, ctx, stage: Stage, alive):
        target_count = count_for_fraction(ctx.n_pool, stage.fraction)
        if target_count > alive.total:
            raise VaralignError(f"stage {ctx.label!r} asks for {target_count} rows but only {alive.total} survived "
                                "the previous stage")
        iters = self.p.num_iters
        if iters > alive.total - target_count:  # every round would drop at most one row: the rest do nothing
            capped = max(1, alive.total - target_count)
            if alive.total == target_count:
                print(f"varalign: note: VAS-D has no row to drop (the previous stage kept exactly {target_count:,}); "
                      f"--num_iters {iters} capped at 1, a round that keeps every row", file=sys.stderr)
            else:
                print(f"varalign: note: --num_iters {iters} capped at {capped} (VAS-D drops "
                      f"{alive.total - target_count} rows, at least one per round; the subset is the same)",
                      file=sys.stderr)
            iters = capped
        ctx.info["num_iters_run"] = iters
        t0 = time.perf_counter()
        store, offsets, g_all, g_cand = self._collect(ctx, alive)
        collect_s = time.perf_counter() - t0
        project_s = 0.0
        first_target = (g_all / ctx.n_pool).astype(np.float32)
        if self.p.mode == "lowrank":  # fast mode: every round in a rank-r subspace
            t0 = time.perf_counter()
            basis = lowrank_basis(g_cand, self.p.rank)
            store = project_store(store, basis, path=f"{store.path}.rank{self.p.rank}", num_workers=ctx.threads,
                                  device=self.device, mapper=ctx.mapper(f"{ctx.label} (projection)"))
            b64 = basis.astype(np.float64)
            with threadpool_limits(limits=1):  # the same numbers whatever the core count
                g_cand = b64.T @ g_cand @ b64
                first_target = (b64.T @ first_target.astype(np.float64) @ b64).astype(np.float32)
            project_s = time.perf_counter() - t0
        state, checkpoint = ctx.state("rounds")
        # the per-candidate state (removed_at, last score) lives in flat files next to the store, so the rounds'
        # memory does not grow with the candidates; the embeddings stay in the on-disk store
        state_dir = ctx.scratch() / "rounds"
        state_dir.mkdir(exist_ok=True)
        res = vas_d_iterate(store, g_cand, first_target, target_count, iters, ctx.threads, ctx.quiet, state=state,
                            checkpoint=checkpoint, device=self.device, mapper=ctx.mapper(f"{ctx.label} rounds"),
                            state_dir=str(state_dir))
        # where the time went (the manifest's stage record; benchmarks/bench_gpu.py fits per-round rates to it)
        ctx.info["timing"] = {"collect_s": round(collect_s, 3), "project_s": round(project_s, 3),
                              "candidates": store.rows} | {
            k: round(v, 3) if isinstance(v, float) else v for k, v in res.timing.items()}
        return self._outputs(ctx, alive, offsets, res)

    def _collect(self, ctx, alive) -> tuple[CandidateStore, np.ndarray, np.ndarray, np.ndarray]:
        """One pass over the embeddings: the candidates into the store, the Grams of the pool and of them."""
        offsets = np.cumsum([0] + alive.counts)
        dtype = np.result_type(*[m.dtype for m in ctx.members(self.key, self.dim)])
        store = CandidateStore.create(str(ctx.scratch() / "candidates.bin"), alive.total, self.dim, dtype)
        direct = ctx.shared_filesystem
        tasks = ((i, (ctx.shards[i], self.key, self.dim, ctx.pool_rows(i), ctx.rows(alive, i),
                      store.path if direct else None, int(offsets[i]), self.device)) for i in range(ctx.num_shards))

        def keep_grams(i: int, result: tuple) -> dict[str, np.ndarray]:
            if result[2] is not None:  # rows returned by a worker that cannot write the store
                write_rows(store.path, int(offsets[i]), result[2])
            return {"g_all": result[0], "g_cand": result[1]}

        g_all = np.zeros((self.dim, self.dim), dtype=np.float64)
        g_cand = np.zeros((self.dim, self.dim), dtype=np.float64)
        for _, r in ctx.map("collect", collect_shard, tasks, f"{ctx.label} (npz)", on_result=keep_grams):
            g_all += r["g_all"]  # in shard order: the sums do not depend on the executor
            g_cand += r["g_cand"]
        return store, offsets, g_all, g_cand

    def _outputs(self, ctx, alive, offsets: np.ndarray, res: VasDResult):
        """Split the per-candidate result into per-shard keep masks and --save_scores columns."""
        def split(i: int) -> np.ndarray:
            a = ctx.mask(alive, i)
            keep, removed_at, last_score = res.part(int(offsets[i]), int(offsets[i + 1]))
            removed = np.full(len(a), -1, dtype=np.int32)
            removed[a] = removed_at
            last = np.full(len(a), np.nan, dtype=np.float32)
            last[a] = last_score
            ctx.put_array("removed_at", i, removed)
            ctx.put_array("score", i, last)
            return ctx.expand(alive, i, keep)

        out = ctx.save_masks(split(i) for i in range(ctx.num_shards))
        ctx.add_column(f"{ctx.label}_removed_at", lambda i: pa.array(ctx.get_array("removed_at", i)))
        ctx.add_column(f"{ctx.label}_score", lambda i: pa.array(ctx.get_array("score", i), mask=~ctx.mask(alive, i)))
        return out


register(Method("vas_d", "VAS-D: greedy VAS against the selection itself (first target: the whole pool)", VasDParams,
                VasD, keep="fraction", uses_device=True))


@name("vas_d", "VAS-D ∩ CLIP score: CLIP stage, then greedy VAS against the selection itself")
def _vas_d(options: dict[str, Any]) -> list[Stage]:
    first = clip_stage(options, "top_k", "vas_d")
    if options.get("fraction_vas") is None or options.get("threshold_vas") is not None:
        raise VaralignError("vas_d needs --fraction_vas (not --threshold_vas)")
    check_fractions_shrink(options)
    return [first, Stage("vas_d", stage_params("vas_d", options), options.get("fraction_vas"))]
