"""Passes over a resident block of rows as loops over its lanes, read straight from the block's ref:
each pass loads a slice of `SLICE` lanes at a time, folds it elementwise into per-lane partial results
held in registers (independent chains that keep the VALU slots busy instead of waiting on one), and
crosses lanes once at its end.

Why loops: written as whole-block jnp expressions, every intermediate used more than once (the
sanitised logits, the lane iota) is an (R, V) array Mosaic stores to VMEM and loads back, and the store
slot (one a bundle) then bounds the kernel: 17,516 stores of its 25,779 straight-line bundles per block
in the deviceless v5e compile of the `top_p` workload (B=64, V=128256, float32). Greedy's pass
(`max_and_first_index`) is one such loop: the row maximum and the first index of it in one read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vsampler.core.numerics import NEG_INF

LANES = 128
SLICE = 512  # lanes a pass folds at once: 4 vregs per row tile, each an independent partial result
UNROLL = 8  # slices a loop iteration folds (Mosaic); interpret mode: 1, whose XLA compile grows with it

Acc = Any  # a pytree of (R, width) arrays: one pass's per-lane partial results


@dataclasses.dataclass(frozen=True)
class LaneWalk:
    """How a pass walks `lanes` lanes of a ref: `steps` slices of `width` lanes (SLICE, or the whole
    row when narrower), then, when `lanes` is not a whole number of slices, the row's last `width`
    lanes once more with the lanes already walked masked (`overlap`)."""

    lanes: int

    @property
    def width(self) -> int:
        return min(SLICE, self.lanes)

    @property
    def steps(self) -> int:
        return self.lanes // self.width

    @property
    def overlap(self) -> bool:
        return self.lanes % self.width != 0


def walk(
    walk_: LaneWalk,
    load: Callable[[Any, int], Any],
    update: Callable[..., Acc],
    init: Callable[[], Acc],
    *,
    rows: int,
    unrolled: bool = True,
) -> Acc:
    """One pass: `acc = update(acc, values, idx, valid)` over the walk's slices: `values = load(start,
    width)` the slice's values (`start` its first lane: traced and a multiple of `LANES` inside the
    loop; static and possibly unaligned for the overlapping last slice), `idx` their lane indices
    (R, width) int32, `valid` None, or for the overlapping last slice the mask of the lanes not walked
    before (the update must leave the others out).

    The slices are a `fori_loop`, `UNROLL` of them an iteration when `unrolled` (Mosaic; interpret
    mode's XLA compile grows with the unrolled body). Measured on v5e (deviceless static estimate, a
    mass pass over two (16, 128512) float32 refs): 0.87 bundles a vreg with 8 slices an iteration,
    3.9 with 2 (each iteration then waits on the last's loads and adds); a pass written out whole
    was 0.71 on its own, but inside the sampling kernel the scheduler hoisted the loads of its 250
    slices so far ahead that the spills overflowed VMEM (129 MB)."""
    width = walk_.width
    lane = lax.broadcasted_iota(jnp.int32, (rows, width), 1)

    def at(acc, start, valid=None):
        return update(acc, load(start, width), lane + start, valid)

    acc = init()
    if walk_.steps:
        unroll = max(1, min(UNROLL if unrolled else 1, walk_.steps))
        acc = lax.fori_loop(0, walk_.steps, lambda j, a: at(a, pl.multiple_of(j * width, LANES)), acc, unroll=unroll)
    if walk_.overlap:
        start = walk_.lanes - width
        acc = at(acc, start, lane + start >= walk_.steps * width)
    return acc


def lanes_max(a: jax.Array) -> jax.Array:
    return jnp.max(a, axis=-1, keepdims=True)


def lanes_min(a: jax.Array) -> jax.Array:
    return jnp.min(a, axis=-1, keepdims=True)


def lanes_sum(a: jax.Array) -> jax.Array:
    return jnp.sum(a, axis=-1, keepdims=True)


def max_and_first_index(
    x_ref, vocab: int, *, prepare: Callable[[jax.Array, jax.Array], jax.Array] | None = None, unrolled: bool = True
) -> tuple[jax.Array, jax.Array]:
    """One pass: each row's largest value (NaN left out; -inf for a row of none) and the first index
    holding it (0 for a row of none), (R, 1) each; `prepare(x, idx)` masks each loaded slice first (the
    min_tokens EOS mask). Strictly greater values replace a lane's held one, so each lane keeps its
    first maximum; lanes then give the row's first."""
    rows = x_ref.shape[0]
    walk_ = LaneWalk(vocab)

    def load(start, size):
        return x_ref[:, pl.ds(start, size)].astype(jnp.float32)

    def update(acc, x, idx, valid):
        if prepare is not None:
            x = prepare(x, idx)
        m, i = acc
        above = x > m  # NaN: never
        if valid is not None:
            above &= valid
        return jnp.where(above, x, m), jnp.where(above, idx, i)

    def init():
        shape = (rows, walk_.width)
        return jnp.full(shape, NEG_INF, jnp.float32), jnp.full(shape, vocab, jnp.int32)

    m, i = walk(walk_, load, update, init, rows=rows, unrolled=unrolled)
    x_max = lanes_max(m)
    first = lanes_min(jnp.where(m == x_max, i, vocab))
    return x_max, jnp.where(first >= vocab, 0, first)
