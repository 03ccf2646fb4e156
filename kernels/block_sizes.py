"""Block-size policy for the fused sampling kernel: rows per grid step and the VMEM limit, per backend
and TPU generation.

The kernel keeps a block of R rows of the logits resident in VMEM across all of its passes. Its working
set is the double-buffered input block plus the float32 temporaries the passes keep alive (the scaled
logits, exp(s - max), the kept mass and an index iota, about `TEMPORARIES` blocks of R x V x 4 bytes).
R is the sublane tile (8 rows; 16 for 2-byte dtypes, which pack two rows per sublane), two tiles for a
float32 batch of 32 rows or more where they fit (WIDE_F32_BLOCKS below), unless the batch is smaller,
in which case one block holds the whole batch. Up to GROUP_BLOCKS blocks (DEEP_GROUP_BLOCKS for top-p
alone's deeper candidates) are one grid step of the grouped kernel where they divide the batch
(`sampler_grouped.py`; a batch of one block too, whose copy that kernel takes in parts). The VMEM
limit is set deliberately: the working set plus a quarter (and 4 MiB), within the generation's
physical VMEM less an eighth for Mosaic's own scratch.

When that block does not fit (v4's 16 MiB above ~50k vocabulary), the plan switches to the chunked
variant (`sampler_chunked.py`): the same R rows resident, but every pass over (R, CHUNK) slices, so
the temporaries are chunk-sized and VMEM holds little more than the logits: double-buffered when two
copies fit, else single-buffered (the next block's copy then waits for this block's passes). Only a
configuration that fits neither way is refused here, with the numbers, before any compile.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from vsampler.kernels import candidates

MiB = 1 << 20
TEMPORARIES = 5  # f32 blocks alive at once besides the input: s, e, kept mass, iota, a mask/select temp
# (measured: Mosaic reported 6.19 MB of scoped VMEM for an 8 x 32000 float32 block, 24 bytes per
# element against the 28 this estimate charges)
MASK_TEMPORARIES = 2  # with an allowed-token mask: its words repeated to (R, V) int32, and the bits
# (measured on v5e, 8 x 128256 float32: 19.6 MiB without the mask, 26.1 MiB with it and 8 log-prob entries)
CHUNK = 4096  # lanes per slice in the chunked variant: a multiple of 4096 keeps the mask words lane-aligned
CHUNK_TEMPORARIES = 8  # (R, CHUNK) float32 arrays alive within a pass (measured on v4: 6.2 for 8 rows)
CHUNK_MASK_TEMPORARIES = 8  # with the mask and log-probs (measured on v4, 8 x 256000 float32: 16 in all)


# WIDE_F32_BLOCKS: a float32 batch of 32 rows or more takes blocks of 16 rows (two sublane tiles) where
# the resident working set takes at most 60% of the VMEM budget: the candidate path's searches are
# bound by each pass's reduction latency, not its width, so 16 rows cost little more a block than 8
# (static estimate, v5e, B=64, V=128256, full, the fast path alone: 169,655 cycles with 8-row blocks,
# 136,926 with 16; compiled with its fallback and 8 log-prob entries at V=152064 it used 61 MiB).
# bfloat16 blocks hold 16 rows already; 32 did not fit v5e's VMEM.


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    name: str
    vmem_bytes: int  # physical VMEM per TensorCore
    hbm_bytes_per_s: float  # HBM bandwidth per chip, for the estimate `compile-check` prints
    tensorcores: int = 1  # TensorCores a chip splits a `parallel` grid over (megacore: v4, v5p)

    @property
    def vmem_budget(self) -> int:
        """What the kernel may ask for: physical VMEM less an eighth for Mosaic's internal scratch."""
        return self.vmem_bytes - self.vmem_bytes // 8


# the figures jax's own Pallas TPU backend uses (jax._src.pallas.mosaic.tpu_info)
TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", 16 * MiB, 1.23e12, tensorcores=2),
    "v5e": TpuGeneration("v5e", 128 * MiB, 8.20e11),
    "v5p": TpuGeneration("v5p", 64 * MiB, 2.46e12, tensorcores=2),
    "v6e": TpuGeneration("v6e", 128 * MiB, 1.64e12),
}
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    block_rows: int  # R
    padded_batch: int  # B rounded up to a multiple of R
    working_set_bytes: int
    vmem_limit_bytes: int | None  # None: leave the backend default (interpret mode)
    chunk: int | None = None  # None: the resident variant; else the chunked variant's slice width
    buffers: int = 2  # VMEM copies of the logits block (chunked variant)
    group_rows: int | None = None  # the resident variant: rows a grid step of `sampler_grouped` takes
    deep_group_rows: int | None = None  # the same for top-p alone's deeper candidates (DEEP_GROUP_BLOCKS)

    def group_for(self, depth: int) -> int | None:
        """Rows a grid step of the grouped kernel takes for candidates `depth` deep (None: not grouped)."""
        return self.deep_group_rows if depth > 2 else self.group_rows

    @property
    def step_rows(self) -> int:
        """Rows that are whole grid steps of this plan's kernel whatever its candidates' depth: the least
        common multiple of the block and the group sizes."""
        return math.lcm(self.block_rows, self.group_rows or 1, self.deep_group_rows or 1)


SUBLANES = 8  # a vreg's rows of 32-bit values


def sublane_rows(dtype: np.dtype | str) -> int:
    return 2 * SUBLANES if np.dtype(dtype).itemsize == 2 else SUBLANES


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def whole_row_temporaries(block_rows: int, vocab: int, allowed: bool = False) -> int:
    """Estimated VMEM bytes of a block's whole-row float32 temporaries (`TEMPORARIES`, and
    `MASK_TEMPORARIES` with an allowed-token mask), rows padded to 8 and lanes to 128."""
    temporaries = TEMPORARIES + (MASK_TEMPORARIES if allowed else 0)
    return temporaries * _round_up(block_rows, 8) * _round_up(vocab, 128) * 4


def working_set(block_rows: int, vocab: int, dtype: np.dtype | str, allowed: bool = False) -> int:
    """Estimated VMEM bytes: Mosaic pads lanes to 128 and rows to the sublane tile of each dtype."""
    lanes = _round_up(vocab, 128)
    input_rows = _round_up(block_rows, sublane_rows(dtype))
    f32_rows = _round_up(block_rows, 8)
    # the candidate path's scratch (`candidates.py`), at its largest: top-p alone's deeper layout, or the
    # two-deep one's wider layout from candidates.WIDE_VOCAB up
    layouts = [candidates.ColumnLayout.of(vocab, depth) for depth in (2, candidates.TOP_P_DEPTH)]
    scratch = max((layout.scratch_bytes(f32_rows) for layout in layouts if layout is not None), default=0)
    inputs = 2 * lanes * input_rows * np.dtype(dtype).itemsize
    return inputs + whole_row_temporaries(block_rows, vocab, allowed) + scratch


def chunked_working_set(block_rows: int, vocab: int, dtype: np.dtype | str, allowed: bool, buffers: int) -> int:
    """Estimated VMEM bytes of the chunked variant: `buffers` copies of the CHUNK-aligned block (and of
    its mask words) plus chunk-sized temporaries."""
    lanes = _round_up(vocab, CHUNK)
    input_rows = _round_up(block_rows, sublane_rows(dtype))
    f32_rows = _round_up(block_rows, 8)
    block = input_rows * lanes * np.dtype(dtype).itemsize + (f32_rows * (lanes // 32) * 4 if allowed else 0)
    temporaries = CHUNK_TEMPORARIES + (CHUNK_MASK_TEMPORARIES if allowed else 0)
    return buffers * block + temporaries * f32_rows * CHUNK * 4


# GROUP_BLOCKS: the resident variant takes up to this many blocks a grid step where the batch holds
# them (`sampler_grouped.py`): the candidates' sampling stage, bound by its passes' latency, then runs
# once over their rows instead of once a block. Static estimate, v5e, B=256, V=128256, 4 / 8 / 16
# blocks a step (`compile-check --estimate`): top_k bfloat16 254,678 / 224,888 / 204,457 cycles,
# float32 - / 295,990 / 260,430; full bfloat16 - / 254,498 / 231,247, float32 - / 325,744 / 300,192;
# top_p bfloat16 550,387 / 524,218 / none. Top-p alone's deeper candidates (7,168 to 8,192 folded a
# row against 2,048) take at most DEEP_GROUP_BLOCKS: at 16 its group scratch pushed B=256, V=256000,
# bfloat16 out of v5e's VMEM budget (no group at all) and its profiled compile at V=128256 out of the
# estimate's (the kernel itself fits: 64.3 MiB of 82.1).
GROUP_BLOCKS = 16
DEEP_GROUP_BLOCKS = 8


def group_rows(
    block_rows: int, padded_batch: int, tensorcores: int = 1, most: int = GROUP_BLOCKS, tile_rows: int = SUBLANES
) -> int | None:
    """Rows a grid step of the grouped kernel takes: the most blocks, up to `most`, that divide the
    batch's blocks evenly and leave a grid step for each of the chip's `tensorcores`. One block a step
    only where each TensorCore runs one step and the block is whole tiles of `tile_rows` (the dtype's
    `sublane_rows`): a batch of one block has nothing to share, but the kernel copies its first block in
    parts (`sampler_grouped.FIRST_COPY_PARTS`). A block of part of a tile has little copy to hide and
    costs the passes a whole tile's (v5e, B=8, V=128256, bfloat16, top-p alone: 25,056 cycles by the
    per-block kernel, 26,084 grouped), and an odd row count fails Mosaic's tile alignment there. None
    where more one-block steps would follow each other (Pallas's own pipeline, copying the next step's
    block during this one, serves them) or `most` is below one."""
    if most < 1:
        return None
    blocks = padded_batch // block_rows
    taken = max((d for d in range(1, most + 1) if blocks % d == 0 and blocks // d >= tensorcores), default=1)
    if taken == 1 and (blocks > tensorcores or block_rows % tile_rows):
        return None
    return taken * block_rows


# The group's sampling stage holds about this many (group rows, folded candidate lanes) float32 arrays
# live at once beyond the group's scratch (weights, kept weights, the searches' and the draw's
# temporaries), in VMEM Mosaic allocates itself. Compiled (VMEM used, MiB): where they outgrow half a
# block's whole-row temporaries (`TEMPORARIES`) a group's row costs its scratch and these (v4, V=32000,
# float32, 8-row blocks: `full`, 2,048 candidates a row, 8.1 with a 32-row group, 10.3 with 64, over
# the 14 MiB limit with 128, ~67 KiB a row, ~6 arrays; top-p alone, 7,168, 11.35 with 32 rows, over
# with 64); where they do not, the plan's generous count of the block already holds them (v5e,
# V=256000, bfloat16, 16-row blocks: `full` 72.6 with 64 rows, 73.9 with 128; top-p alone 61.5 and
# 74.3, against 104.75 planned). Until 2026-12-07 only the scratch was counted, and v4 failed to compile
# `full` at B=256, V=32000, float32 (a 128-row group) and top-p alone at B=128 and 256 there (64 rows).
STAGE_ARRAYS = {2: 6, candidates.TOP_P_DEPTH: 4}


def group_stage_bytes(group: int | None, vocab: int, depth: int, block_temporaries: int) -> int:
    """VMEM the group's sampling stage adds for its temporaries over `depth`-deep candidates, beside a
    block whose whole-row temporaries take `block_temporaries` bytes: none where they fit in half of
    those (Mosaic reuses that room, and `working_set` counts it generously), all of them where not."""
    layout = candidates.ColumnLayout.of(vocab, depth)
    if group is None or layout is None:
        return 0
    stage = STAGE_ARRAYS[depth] * group * layout.folded_lanes[0] * 4
    return 0 if stage <= block_temporaries // 2 else stage


def group_scratch_bytes(group: int | None, vocab: int, depth: int = 2) -> int:
    """VMEM the grouped kernel adds for `depth`-deep candidates: the group's folded candidates (values,
    ids), their bounds, and a row's whole mass, that pass's trips and whether the candidates decided it."""
    layout = candidates.ColumnLayout.of(vocab, depth)
    if group is None or layout is None:
        return 0
    values, bounds = layout.folded_lanes
    return group * (2 * values + bounds + 3) * 4


def _limit(needed: int, budget: int) -> int:
    return min(budget, int(needed * 1.25) + 4 * MiB)


def plan(
    batch: int,
    vocab: int,
    dtype: np.dtype | str,
    generation: str | None,
    allowed: bool = False,
    *,
    chunked: bool = False,
) -> BlockPlan:
    """The rows per block, the variant and the VMEM limit for `generation` ("v4", "v5e", "v5p", "v6e";
    None: interpret); `allowed`: the kernel also unpacks an allowed-token mask; `chunked`: the chunked
    variant even where the resident one fits (to verify it in interpret mode)."""
    rows = sublane_rows(dtype)
    block_rows = batch if batch <= rows else rows
    if generation in TPU_GENERATIONS and not chunked and rows == 8 and batch >= 4 * rows:
        doubled = working_set(2 * rows, vocab, dtype, allowed)
        if doubled <= 0.6 * TPU_GENERATIONS[generation].vmem_budget:  # with room: the estimate is rough
            block_rows = 2 * rows  # float32: two sublane tiles a block where they fit (WIDE_F32_BLOCKS)
    padded = -(-batch // block_rows) * block_rows
    needed = working_set(block_rows, vocab, dtype, allowed)
    tensorcores = TPU_GENERATIONS[generation].tensorcores if generation in TPU_GENERATIONS else 1
    group = group_rows(block_rows, padded, tensorcores, tile_rows=rows)
    deep = group_rows(block_rows, padded, tensorcores, DEEP_GROUP_BLOCKS, rows)
    if generation is not None and generation not in TPU_GENERATIONS:
        raise ValueError(f"unknown TPU generation {generation!r}; known: {sorted(TPU_GENERATIONS)}")
    budget = TPU_GENERATIONS[generation].vmem_budget if generation else None

    block_temporaries = whole_row_temporaries(block_rows, vocab)  # as measured: without the mask's

    def group_needed(rows_: int | None, depth: int) -> int:  # the block's, the group's scratch and stage
        stage = group_stage_bytes(rows_, vocab, depth, block_temporaries)
        return needed + group_scratch_bytes(rows_, vocab, depth) + stage

    def grouped_needed() -> int:  # one kernel per call: the larger of its two possible groups
        return max(group_needed(group, 2), group_needed(deep, candidates.TOP_P_DEPTH))

    while budget is not None and grouped_needed() > budget and (group or deep):  # the largest groups that fit
        if group_needed(group, 2) >= group_needed(deep, candidates.TOP_P_DEPTH):
            group = group_rows(block_rows, padded, tensorcores, group // block_rows - 1, rows)
        else:
            deep = group_rows(block_rows, padded, tensorcores, deep // block_rows - 1, rows)
    groups = {"group_rows": group, "deep_group_rows": deep}
    if generation is None:
        if chunked:
            return BlockPlan(block_rows, padded, chunked_working_set(block_rows, vocab, dtype, allowed, 2), None, CHUNK)
        return BlockPlan(block_rows, padded, grouped_needed(), None, **groups)
    if grouped_needed() <= budget and not chunked:
        return BlockPlan(block_rows, padded, grouped_needed(), _limit(grouped_needed(), budget), **groups)
    if needed <= budget and not chunked:
        return BlockPlan(block_rows, padded, needed, _limit(needed, budget))
    for buffers in (2, 1):
        chunked_needed = chunked_working_set(block_rows, vocab, dtype, allowed, buffers)
        if chunked_needed <= budget:
            return BlockPlan(block_rows, padded, chunked_needed, _limit(chunked_needed, budget), CHUNK, buffers)
    raise ValueError(
        f"the fused sampler's block ({block_rows} x {vocab} {np.dtype(dtype).name}) needs {needed / MiB:.1f} MiB "
        f"of VMEM resident and {chunked_needed / MiB:.1f} MiB chunked, over {generation}'s "
        f"{budget / MiB:.0f} MiB budget"
    )


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    chunk: int  # values per masked load: a power of two (Triton arrays must be)
    num_warps: int


def gpu_plan(vocab: int) -> GpuPlan:
    """Chunk and warps for the Triton variant: one program per row loops over the row in chunks; a chunk of
    2048 float32 values is 16 per thread at 4 warps, large enough to hide load latency, small enough to
    stay in registers with the few temporaries a pass keeps."""
    if vocab <= 4096:
        return GpuPlan(chunk=max(128, 1 << (vocab - 1).bit_length()) if vocab < 2048 else 2048, num_warps=4)
    return GpuPlan(chunk=2048 if vocab < 65536 else 4096, num_warps=4 if vocab < 65536 else 8)
