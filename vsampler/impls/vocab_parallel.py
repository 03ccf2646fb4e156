"""Vocabulary-parallel sampling: the spec (`vsampler.core.reference`) on logits sharded over the vocabulary,
as a tensor-parallel lm head leaves them, without ever gathering them.

`vsampler.sample(logits, params, key, mesh=..., vocab_axis="tp")` lands here (`sample` below, on the
inputs `vsampler.core.inputs.prepare` built from the global shapes). Shapes and dtypes:

  logits   (B, V) float32 or bfloat16 (math in float32), sharded or shardable as `P(None, vocab_axis)`
           on the mesh: shard j holds the ids [j * W, (j + 1) * W), W = ceil(V / n) for n shards.
           Padding: a V that n does not divide is padded with -inf columns to n * W before sharding.
           (JAX cannot lay a (B, V) array out unevenly over the vocabulary, so such logits arrive
           replicated or otherwise laid out, and each device just slices its columns.) A padded id is
           -inf in every stage, so it is never kept, never the greedy token, never drawn.
  params, key, history (B, L), prompt_len, eos_token_id: as `vsampler.sample`, checked and sanitised
           on the global shapes; small, and replicated on every shard.
  returns  (B,) int32 tokens in [0, V), replicated on every device: the reference's token for the same
           key (the spec's draw: one uniform u per row, drawn as `vsampler.core.inputs.draw_uniforms` does).

Inside `jax.shard_map` each shard works on its (B, W) columns with per-row (B, 1) columns of
statistics; the shards agree on every per-row decision through collectives of a few scalars per row
(n = shards):

  1-3  bias and penalties: `vsampler.core.penalties` on the shard's columns, every global id (history,
       bias mapping) shifted by the shard's offset and ids outside its range dropped: a B x L
       gather/scatter per shard, never a (B, V) table. A mapping bias becomes the shard's (W,) row
       of it (x + 0 is x).                                                              no communication
  4    min_tokens: which rows are too early comes from the replicated history; each shard masks the
       EOS ids in its range.                                                            no communication
  5    NaN -> -inf; the row maximum (a +inf anywhere: +inf tokens share the mass).           pmax (B, 1)
  6    greedy: the lowest global index holding the maximum.                                  pmin (B, 1)
       sampled rows: s = x * (1 / T), e = exp(s - max s), the maximum's e exactly 1.
  7    top-k: the k-th largest s by `vsampler.core.numerics.largest_value_with` (value-snapping
       bisection) on a count psum'ed over the shards, with pmin / pmax as its row min / max.
       pmin + psum (B, 1), then 12 plain passes of one psum (B, 1) and snapping passes of psum, pmin
       and pmax (B, 1), about log2(#values in the last bracket) of them.
  8    top-p over what top-k kept: the same search, on the values e (the reference groups ties by e)
       and the kept mass: keep e >= e*, the largest e whose inclusive mass reaches top_p * total. Each
       mass is the n per-shard sums, all-gathered (B, n) and added in shard order on every shard, so
       all shards hold the same float and their loops run the same passes.
       all-gather (B, n), then 12 plain passes of one all-gather and snapping passes of all-gather,
       pmin and pmax.
  9    min-p: e >= min_p.                                                               no communication
  10   draw: the shards' kept masses all-gathered (B, n); every shard finds the same owner, the first
       shard whose running prefix exceeds u * total; only the owner searches its columns (chunk and
       group sums, then one chunk) for the first id whose prefix exceeds u * total and contributes it.
       One pmax of (B, 2) ints (the owner's id; the last kept id, for a total that rounding leaves at
       u * total, and for a row with nothing kept: token 0) settles it.  all-gather (B, n), pmax (B, 2)

Communication per call does not depend on V. Measured from the compiled HLO (`vsampler.tools.communication`:
`communication_report`; `pytest bench/test_vocab_parallel.py --benchmark-only`) for B = 8, V = 128256
on 8 shards with top-k, top-p, min-p and a repetition penalty: 19 collective instructions, 1152 bytes
per device outside the data-dependent loops plus 192 per snapping pass (at most 13440 in all), against
513024 bytes in and 4104192 out per device for one all-gather of the float32 logits.

Every stage repeats the reference's arithmetic on each shard's own columns; only float sums run in
another order (per shard, then across shards), as on the XLA path, so a token can differ from the
reference's only where a mass lies within float rounding of a threshold (top-p's top_p * total, the
draw's u * total).

The mesh may have other axes: the batch is replicated across them (every group along the vocabulary
axis computes the same tokens); logits sharded over the batch on such an axis are first gathered
over it by XLA (a (B/m, W) piece per device; not done here: a batch axis is future work).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from vsampler.core import penalties, registry
from vsampler.core.inputs import RowParams, SamplerInputs, unpack_allowed
from vsampler.core.numerics import NEG_INF, first_crossing, inverse_temperature, largest_value_with, weight
from vsampler.core.params import Stages
from vsampler.core.sampling import VOCAB_PARALLEL

CHUNK = 128  # columns per chunk in the owner's draw search
GROUP = 32  # chunks per group in the owner's draw search

AnyMesh = Mesh | AbstractMesh


# ------------------------------------------------------------------------------------------ the mesh


def resolve_mesh(mesh: AnyMesh | None, vocab_axis: str) -> AnyMesh:
    """The mesh to shard the vocabulary on: `mesh`, else the ambient one (`jax.set_mesh`); a ValueError
    when there is none or `vocab_axis` is not one of its axes."""
    if mesh is None:
        mesh = jax.sharding.get_mesh()
        if mesh.empty:
            mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                f"vocab_axis={vocab_axis!r} needs a mesh: pass mesh=..., or call sample inside "
                "`with jax.set_mesh(mesh):`"
            )
    elif not isinstance(mesh, (Mesh, AbstractMesh)):
        raise ValueError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, got {type(mesh).__name__}")
    if vocab_axis not in mesh.axis_names:
        raise ValueError(f"vocab_axis={vocab_axis!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
    return mesh


# ------------------------------------------------------------------------ per-row cross-shard reductions


@dataclasses.dataclass(frozen=True)
class _Shard:
    """This shard's place in the vocabulary and the per-row reductions over the whole row: each takes
    (B, W) and returns (B, 1), the same on every shard."""

    axis: str
    width: int  # W: columns per shard
    index: jax.Array  # this shard's position along the axis
    offset: jax.Array  # its first global id, index * W

    def max(self, a: jax.Array) -> jax.Array:
        return lax.pmax(jnp.max(a, axis=-1, keepdims=True), self.axis)

    def min(self, a: jax.Array) -> jax.Array:
        return lax.pmin(jnp.min(a, axis=-1, keepdims=True), self.axis)

    def count(self, mask: jax.Array) -> jax.Array:
        """How many True per row (int32: exact in any order)."""
        return lax.psum(jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32), self.axis)

    def sum(self, a: jax.Array) -> jax.Array:
        """The row sum: per-shard sums gathered (B, n) and added in shard order on every shard, so all
        shards hold the same float (the searches' loops then run the same passes everywhere)."""
        return jnp.sum(self.gather(jnp.sum(a, axis=-1)), axis=1, keepdims=True)

    def gather(self, column: jax.Array) -> jax.Array:
        """(B,) per shard -> (B, n), shard j's values in column j."""
        return lax.all_gather(column, self.axis, axis=1)

    def local(self, ids: jax.Array, vocab: int) -> jax.Array:
        """Global ids -> this shard's columns; `width` (out of range: dropped by scatters) elsewhere."""
        inside = (ids >= self.offset) & (ids < self.offset + self.width) & (ids < vocab)
        return jnp.where(inside, ids - self.offset, self.width)


class _Replicated(NamedTuple):
    """The small per-row inputs every shard holds whole."""

    params: RowParams
    u: jax.Array | None  # (B,) float32
    history: jax.Array | None  # (B, L) int32 global ids
    prompt_len: jax.Array  # (B,) int32
    too_early: jax.Array | None  # (B,) bool: rows whose EOS ids stage 4 masks
    eos_ids: jax.Array | None  # (E,) int32 global ids
    bias_ids: jax.Array | None  # (N,) int32 global ids
    bias_values: jax.Array | None  # (N,) float32
    empty_token: jax.Array  # () int32: the token of a row with no finite logit left


# ------------------------------------------------------------------------------------------ stages


def _penalised(
    x: jax.Array, bias: jax.Array | None, r: _Replicated, stages: Stages, sh: _Shard, vocab: int
) -> jax.Array:
    """Stages 1-4 on this shard's columns, float32 (B, W): `vsampler.core.penalties` on shard-local ids."""
    history = None
    if r.history is not None:
        local = sh.local(r.history, vocab)
        history = jnp.where(local < sh.width, local, -1)  # other shards' ids: empty slots here
    if r.bias_ids is not None:
        # a mapping bias becomes this shard's (W,) row of it (0 elsewhere: x + 0 is x), so that no
        # scatter index ever leaves the shard (`penalties` adds a mapping with a scatter that assumes
        # its ids in range)
        bias = jnp.zeros((sh.width,), jnp.float32).at[sh.local(r.bias_ids, vocab)].add(r.bias_values, mode="drop")
    local_inputs = SamplerInputs(
        logits=x,
        params=r.params,
        stages=dataclasses.replace(stages, prompt_ignore=False),  # `counted_history` already applied it
        bias_dense=bias,
        bias_ids=None,
        bias_values=None,
        history=history,
        prompt_len=r.prompt_len,
        eos_ids=None,
        u=None,
    )
    x = penalties.penalised_logits(local_inputs, eos_mask=False).astype(jnp.float32)
    if r.too_early is not None:  # stage 4, as `vsampler.core.penalties` writes it, on the EOS ids in range
        rows = jnp.arange(x.shape[0])[:, None]
        eos = sh.local(r.eos_ids, vocab)[None, :]  # ignored (-1) and other shards' ids: dropped
        kept_value = x[rows, jnp.minimum(eos, sh.width - 1)]
        x = x.at[rows, eos].set(jnp.where(r.too_early[:, None], NEG_INF, kept_value), mode="drop")
    return x


def _draw(kept: jax.Array, kept_e: jax.Array, u: jax.Array, sh: _Shard) -> jax.Array:
    """Stage 10: the smallest global index whose inclusive prefix of kept mass exceeds u * total
    (rounding short of it: the last kept id), 0 for rows with nothing kept. (B, 1) int32."""
    batch, width = kept_e.shape
    chunks = jnp.pad(kept_e, ((0, 0), (0, (-width) % CHUNK))).reshape(batch, -1, CHUNK)  # (B, NC, C)
    n_chunks = chunks.shape[1]
    chunk_sums = jnp.sum(chunks, axis=2)
    groups = jnp.pad(chunk_sums, ((0, 0), (0, (-n_chunks) % GROUP))).reshape(batch, -1, GROUP)
    group_sums = jnp.sum(groups, axis=2)  # (B, NG)

    # every shard: the same prefix over the shards' masses (in shard order), the same owner
    masses = sh.gather(jnp.sum(group_sums, axis=1))  # (B, n)
    total = jnp.cumsum(masses, axis=1)[:, -1:]
    target = u[:, None] * total
    owner, before = first_crossing(masses, jnp.zeros_like(total), target)
    crosses = total > target  # False only where rounding leaves u * total at the total: the last kept id

    # the owner: the group, the chunk, the column where its prefix (started at `before`) crosses
    group, before = first_crossing(group_sums, before, target)
    inner, before = first_crossing(jnp.take_along_axis(groups, group[:, :, None], axis=1)[:, 0], before, target)
    chunk = jnp.minimum(group * GROUP + inner, n_chunks - 1)
    inside = jnp.take_along_axis(chunks, chunk[:, :, None], axis=1)[:, 0]  # (B, C)
    positive = inside > 0
    crossed = (before + jnp.cumsum(inside, axis=1) > target) & positive
    last_inside = CHUNK - 1 - jnp.argmax(positive[:, ::-1], axis=1, keepdims=True)
    first_crossed = jnp.argmax(crossed, axis=1, keepdims=True)
    column = chunk * CHUNK + jnp.where(jnp.any(crossed, axis=1, keepdims=True), first_crossed, last_inside)
    last_kept = width - 1 - jnp.argmax(kept[:, ::-1], axis=1, keepdims=True)
    column = jnp.where(jnp.any(positive, axis=1, keepdims=True), column, last_kept)
    mine = (owner == sh.index) & crosses & jnp.any(kept, axis=1, keepdims=True)
    owned = jnp.where(mine, sh.offset + column, -1)
    last = jnp.where(jnp.any(kept, axis=1, keepdims=True), sh.offset + last_kept, -1)

    both = lax.pmax(jnp.concatenate([owned, last], axis=1), sh.axis)  # (B, 2): one all-reduce
    token = jnp.where(crosses, both[:, :1], both[:, 1:])
    return jnp.where(both[:, 1:] >= 0, token, 0)


def _sample_shard(
    x: jax.Array, bias: jax.Array | None, r: _Replicated, *, stages: Stages, axis: str, vocab: int
) -> jax.Array:
    """One shard's part of the call: x (B, W) its columns, bias its (W,) / (B, W) columns or None.
    Returns the (B,) tokens, the same on every shard."""
    width = x.shape[1]
    index = lax.axis_index(axis)
    sh = _Shard(axis=axis, width=width, index=index, offset=index * width)
    p = r.params

    x = _penalised(x, bias, r, stages, sh, vocab)  # stages 1-4
    # 5. sanitising: NaN never wins; +inf tokens share the row's mass
    x = jnp.where(jnp.isnan(x), NEG_INF, x)
    x_max = sh.max(x)
    pos_inf = x_max == jnp.inf
    x = jnp.where(pos_inf, jnp.where(x == jnp.inf, 0.0, NEG_INF), x)
    x_max = jnp.where(pos_inf, 0.0, x_max)
    # 6. greedy: the lowest index of the maximum (0 for a row that is all -inf: every index holds it)
    ids = sh.offset + lax.broadcasted_iota(jnp.int32, x.shape, 1)
    first_max = sh.min(jnp.where(x == x_max, ids, jnp.iinfo(jnp.int32).max))
    empty = x_max[:, 0] == NEG_INF
    if not stages.random:
        return jnp.where(empty, r.empty_token, first_max[:, 0])

    greedy = (p.temperature == 0.0)[:, None]
    inverse_t = inverse_temperature(p.temperature[:, None], x_max)
    s = x * inverse_t
    s_max = x_max * inverse_t  # == max(s): rounding is monotone
    e = weight(s, s_max)  # the reference's: exactly 1 at the maximum, whatever a fused multiply-add does
    sampled = ~greedy & (s_max > NEG_INF)
    kept = s > NEG_INF
    search = functools.partial(largest_value_with, column_min=sh.min, column_max=sh.max)

    # 7. top-k: values >= the k-th largest (a count search; ties at the boundary all kept)
    if stages.top_k:
        k = p.top_k[:, None]

        def count_ge(t: jax.Array) -> jax.Array:
            return sh.count(s >= t)

        lowest = sh.min(jnp.where(s > NEG_INF, s, jnp.inf))
        on = (k > 0) & sampled & (count_ge(lowest) > k)
        kth = search(count_ge, k, s, jnp.where(on, lowest, s_max), s_max, on)
        kept &= ~on | (s >= kth)

    # 8. top-p over what top-k kept: keep e when the mass strictly above it is < top_p * total, i.e.
    #    e >= e*, the largest e whose inclusive mass (everything >= it) still reaches top_p * total
    if stages.top_p:
        top_p = p.top_p[:, None]
        kept_e = jnp.where(kept, e, 0.0)
        target = top_p * sh.sum(kept_e)

        def mass_ge(t: jax.Array) -> jax.Array:
            return sh.sum(jnp.where(kept_e >= t, kept_e, 0.0))

        on = (top_p < 1.0) & sampled
        # each kept token with e below `lo` carries < (1 - p) / (2V): together < (1 - p) * total (total >= 1)
        lo = (1.0 - top_p) / (2.0 * vocab)
        one = jnp.ones_like(top_p)  # the row maximum's e, always kept, and no e is larger
        e_star = search(mass_ge, target, kept_e, jnp.where(on, lo, one), one, on)
        kept &= ~on | (e >= e_star)

    # 9. min-p: p_i >= min_p * p_max  <=>  exp(s_i - max) >= min_p
    if stages.min_p:
        kept &= e >= p.min_p[:, None]

    # 10. the draw
    kept &= sampled
    token = _draw(kept, jnp.where(kept, e, 0.0), r.u, sh)
    return jnp.where(empty, r.empty_token, jnp.where(greedy, first_max, token)[:, 0])


# -------------------------------------------------------------------------------------- public API


def sample(inp: SamplerInputs, *, mesh: AnyMesh, vocab_axis: str) -> jax.Array:
    """The token per row, `(B,)` int32, replicated: `vsampler.core.reference.sample` on logits sharded over
    the vocabulary on `mesh`'s `vocab_axis`, without gathering them (module docstring). `inp` comes from
    `vsampler.core.inputs.prepare` on the global (B, V) logits; call it under `jax.jit`."""
    vocab = inp.logits.shape[1]
    shards = mesh.shape[vocab_axis]
    pad = (-vocab) % shards  # -inf columns up to a multiple of the shard count: never kept, never drawn
    logits = inp.logits
    if inp.allowed is not None:  # stage 0, elementwise on the sharded logits (each device its columns)
        logits = jnp.where(unpack_allowed(inp.allowed, vocab), logits, NEG_INF)
    if pad:
        logits = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=NEG_INF)
    sharded, specs = [logits], [P(None, vocab_axis)]
    bias = inp.bias_dense
    if bias is not None:
        if pad:
            bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(0, pad)])
        sharded.append(bias)
        specs.append(P(vocab_axis) if bias.ndim == 1 else P(None, vocab_axis))
    replicated = _Replicated(
        params=inp.params,
        u=inp.u,
        history=penalties.counted_history(inp) if inp.stages.penalties else None,  # counted on the global ids
        prompt_len=inp.prompt_len,
        too_early=penalties.too_early_for_eos(inp) if penalties.masks_eos(inp) else None,
        eos_ids=inp.eos_ids,
        bias_ids=inp.bias_ids,
        bias_values=inp.bias_values,
        empty_token=jnp.asarray(inp.empty_token, jnp.int32),
    )
    stages = inp.stages

    def per_shard(x: jax.Array, *rest: Any) -> jax.Array:
        *bias_part, r = rest
        return _sample_shard(x, bias_part[0] if bias_part else None, r, stages=stages, axis=vocab_axis, vocab=vocab)

    # check_vma=False: the all-gathered sums leave values JAX types as varying; every output is a
    # reduction every shard computes identically, hence replicated
    run = jax.shard_map(per_shard, mesh=mesh, in_specs=(*specs, P()), out_specs=P(), check_vma=False)
    return run(*sharded, replicated)


registry.register(
    registry.Implementation(
        name=VOCAB_PARALLEL,
        sample=sample,
        process_logits=None,
        description="vocabulary-parallel: logits sharded over a mesh axis, sampled where they lie",
        selectable=False,
        extras={"resolve_mesh": resolve_mesh},
    )
)
