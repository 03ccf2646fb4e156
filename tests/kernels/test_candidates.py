"""The resident kernel's candidate fast path (`vsampler.kernels.candidates`), in interpret mode: the column
pass keeps exactly each column's two largest values (with their first indices) and the third, the fold
keeps each folded lane's largest and bounds the rest, and the
kernel's tokens and kept sets equal the reference's both where the candidates decide a block and where
the block falls back to the whole-row path (which the statistics columns say)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vsampler.kernels import block_sizes, candidates, sampler_grouped
from vsampler.kernels import sampler as kernel

from vsampler import SamplingParams, process_logits, sample
from vsampler.impls import pallas
from vsampler.tools import verification


def _column_of(layout: candidates.ColumnLayout, vreg: int) -> int:
    main = layout.main_chunks * layout.groups
    return vreg % layout.groups if vreg < main else vreg - main


def _expected_candidates(x: np.ndarray, layout: candidates.ColumnLayout):
    """numpy: per row and column lane, the values in vocabulary order; the top m = `layout.depth` (first
    index among equals first) and the (m + 1)-th largest."""
    rows, vocab = x.shape
    width, depth = layout.width, layout.depth
    values = np.full((rows, depth * width), -np.inf, np.float32)
    ids = np.zeros((rows, depth * width), np.int32)
    third = np.full((rows, width), -np.inf, np.float32)
    members: dict[int, list[int]] = {}
    last = (vocab - 1) // 128
    for i in range(vocab):
        # a partial last vreg is read as the row's last 128 lanes: value i sits at lane i - (V - 128)
        lane = i - (vocab - 128) if layout.partial and i // 128 == last else i % 128
        members.setdefault(_column_of(layout, i // 128) * 128 + lane, []).append(i)
    for r in range(rows):
        for lane, idx in members.items():
            order = sorted(idx, key=lambda i: (-x[r, i], i))  # stable: lower index first among equals
            for level, i in enumerate(order[:depth]):
                values[r, level * width + lane], ids[r, level * width + lane] = x[r, i], i
            if len(order) > depth:
                third[r, lane] = x[r, order[depth]]
    return values, ids, third


COLUMN_PASS_CASES = [
    *[
        (vocab, together, 2)
        for together in (1, 3, candidates.COLUMNS_TOGETHER)
        for vocab in (128, 200, 4096, 4224, 9000, 16511)
    ],
    # the wider two-deep layout (WIDE_GROUPS column groups), a partial last vreg
    (candidates.WIDE_VOCAB, candidates.COLUMNS_TOGETHER, 2),
    # top-p alone: TOP_P_DEPTH candidates a lane
    *[
        (vocab, together, candidates.TOP_P_DEPTH)
        for together in (1, candidates.COLUMNS_TOGETHER)
        for vocab in (200, 9000)
    ],
]


@pytest.mark.parametrize(
    ("vocab", "together", "depth", "sanitise"),
    [
        *[(*case, True) for case in COLUMN_PASS_CASES],
        # as the kernel calls it: NaN logits reach the pass as they are
        (9000, candidates.COLUMNS_TOGETHER, 2, False),
        (candidates.WIDE_VOCAB, candidates.COLUMNS_TOGETHER, 2, False),
        (9000, candidates.COLUMNS_TOGETHER, candidates.TOP_P_DEPTH, False),
    ],
)
def test_the_column_pass_keeps_each_columns_largest_and_the_next(vocab, together, depth, sanitise):
    """The column pass against numpy (the two largest of each column lane and the third; for top-p alone
    the TOP_P_DEPTH largest and the next), folding one column group at a time (interpret mode's form),
    3 at once (sets and a remainder of columns) and as the Mosaic kernel does. Given NaN logits as they
    are (`sanitise` False, as the kernel calls it), no NaN is held or reaches a bound: the bounds are
    those of the row without its NaNs (a NaN bound could be dropped by a row reduction, and the lane's
    real bound with it)."""
    layout = candidates.ColumnLayout.of(vocab, depth)
    vregs = -(-vocab // 128)
    assert sorted(_column_of(layout, v) for v in range(vregs)).count(0) >= 1
    assert layout.main_chunks * layout.groups + layout.tail == vregs and 1 <= layout.tail <= layout.groups
    rng = np.random.default_rng(vocab)
    x = np.round(rng.standard_normal((8, vocab)) * 2).astype(np.float32)  # ties within columns
    x[0, :: max(1, vocab // 50)] = np.nan  # sanitised to -inf
    x[1] = -np.inf
    x[1, vocab - 1] = 3.0  # a row with one finite value, in the last (maybe partial) vreg
    clean = np.where(np.isnan(x), -np.inf, x)

    def kernel_body(x_ref, values_ref, ids_ref, third_ref):
        candidates.column_pass(
            x_ref,
            values_ref,
            ids_ref,
            third_ref,
            layout,
            (lambda v, idx: jnp.where(jnp.isnan(v), -jnp.inf, v)) if sanitise else (lambda v, idx: v),
            together=together,
        )

    n = depth * layout.width
    shapes = [(n, jnp.float32), (n, jnp.int32), (layout.width, jnp.float32)]
    from jax.experimental import pallas as pl

    out = pl.pallas_call(
        kernel_body,
        out_shape=[jax.ShapeDtypeStruct((8, n), t) for n, t in shapes],
        interpret=True,
    )(jnp.asarray(x))
    values, ids, third = (np.asarray(a) for a in out)
    want_values, want_ids, want_third = _expected_candidates(clean, layout)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(third, want_third)
    held = want_values > -np.inf
    np.testing.assert_array_equal(ids[held], want_ids[held])


@pytest.mark.parametrize(
    ("vocab", "depth", "dtype", "parts"),
    [
        (16511, 2, "float32", 3),
        (candidates.WIDE_VOCAB, 2, "float32", 4),
        (9000, 4, "float32", 2),
        (140000, 4, "bfloat16", 4),
    ],
)
def test_a_pass_in_parts_reads_each_part_after_its_wait_and_keeps_what_one_pass_keeps(vocab, depth, dtype, parts):
    """The column pass (`key_pass` on bfloat16 top-p alone) over a block that arrives in parts
    (`ColumnLayout.part_lanes`): the block starts as +inf and `wait(k)` copies part k's lanes in, so a
    part read before its wait would keep a +inf; the parts cover the row, in order, and the candidates
    equal those of one pass over the whole block (a partial last vreg, the wide layout, the deep one).
    The rows' sums of exp(x * scale) the pass takes along (`mass_scale`, `candidates.FusedMass`) are the
    whole rows' in both, up to the order of their terms."""
    from jax.experimental import pallas as pl

    layout = candidates.ColumnLayout.of(vocab, depth)
    lanes = layout.part_lanes(parts)
    assert len(lanes) == parts and lanes[0][0] == 0 and lanes[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in itertools.pairwise(lanes))
    rng = np.random.default_rng(vocab)
    x = jnp.asarray(np.round(rng.standard_normal((16, vocab)) * 2), dtype)  # ties within columns
    keyed = candidates.keyed(x.dtype)
    n = (depth + 1) * layout.width if keyed else depth * layout.width
    shapes = [(n, jnp.float32)] if keyed else [(n, jnp.float32), (n, jnp.int32), (layout.width, jnp.float32)]
    out_shape = [jax.ShapeDtypeStruct((16, lanes_), t) for lanes_, t in shapes]
    out_shape.append(jax.ShapeDtypeStruct((16, 1), jnp.float32))  # the rows' sums
    scale = 0.5 + 0.1 * np.arange(16, dtype=np.float32)[:, None]
    waited = []

    def column_pass(x_ref, outs, **in_parts) -> None:
        *outs, mass_ref = outs
        scale = 0.5 + 0.1 * jax.lax.broadcasted_iota(jnp.float32, (16, 1), 0)
        if keyed:
            mass = candidates.key_pass(x_ref, *outs, layout, together=2, mass_scale=scale, **in_parts)
        else:
            mass = candidates.column_pass(
                x_ref, *outs, layout, lambda v, idx: v, together=2, mass_scale=scale, **in_parts
            )
        mass_ref[...] = mass

    def whole(x_ref, *outs):
        column_pass(x_ref, outs)

    def arriving(x_in, *refs):
        *outs, block = refs
        block[...] = jnp.full(block.shape, jnp.inf, block.dtype)

        def wait(k: int) -> None:  # part k's copy "arrives"
            waited.append(k)
            start, stop = lanes[k]
            block[:, start:stop] = x_in[:, start:stop]

        column_pass(block, outs, parts=parts, wait=wait)

    def call(body, scratch):
        return pl.pallas_call(body, out_shape=out_shape, scratch_shapes=scratch, interpret=True)(x)

    from jax.experimental.pallas import tpu as pltpu

    want = call(whole, [])
    got = call(arriving, [pltpu.VMEM(x.shape, x.dtype)])
    assert waited == list(range(parts))
    for a, b in zip(got[:-1], want[:-1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exact = np.exp(np.asarray(x, np.float64) * np.asarray(scale, np.float64)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(want[-1]), exact, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(got[-1]), exact, rtol=2e-6)


@pytest.mark.parametrize(("vocab", "depth"), [(200, 2), (16511, 2), (candidates.WIDE_VOCAB, 2), (9000, 4), (140000, 4)])
def test_bfloat16_keys_keep_what_the_column_pass_and_the_fold_keep(vocab, depth):
    """`key_pass` + `fold_keys` (bfloat16 logits: value and index as one float32 key) against numpy and
    `fold`, up to the keys' documented stand-ins: each column lane's m largest values and the next, -inf
    read as -KEY_LIMIT and +inf as +KEY_LIMIT (an empty slot stays -inf); every id that of its value,
    no id twice, wherever the value is normal (zeros are subnormal keys, whose codes this CPU's flush to
    zero loses: their ids read V, never a token); then the same folded values and bounds as `fold` on
    the decoded candidates, and no value outside the folded ones above their largest bound. Rows with
    a NaN (either sign): a NaN-propagating maximum (XLA's) spreads it over its lane, whose bound reads
    +inf (the row can then only fall back), and nothing decodes to a wrong value or id."""
    layout = candidates.ColumnLayout.of(vocab, depth)
    limit = candidates.KEY_LIMIT
    rng = np.random.default_rng(vocab)
    x = np.round(rng.standard_normal((16, vocab)) * 2).astype(np.float32)  # ties (and zeros)
    x[0, :: max(1, vocab // 50)] = -np.nan
    x[1] = -np.inf
    x[1, vocab - 1] = 3.0
    x[2, 5] = np.inf
    x[3, :: max(1, vocab // 40)] = np.nan
    x[4] = np.nan
    x[5, :7] = [limit, -limit, 1e-40, -1e-40, -0.0, 0.0, limit]  # the stand-ins' own values
    with_nan = [0, 3, 4]
    assert not np.signbit(x[3, 0]) and np.signbit(x[0, 0])
    held = depth * layout.width

    def kernel_body(x_ref, keys_ref):
        candidates.key_pass(x_ref, keys_ref, layout, together=2)

    from jax.experimental import pallas as pl

    shape = jax.ShapeDtypeStruct((16, held + layout.width), jnp.float32)
    keys = pl.pallas_call(kernel_body, out_shape=shape, interpret=True)(jnp.asarray(x, jnp.bfloat16))
    values = np.asarray(candidates.key_values(keys[:, :held], -np.inf))
    ids = np.asarray(candidates.key_ids(keys[:, :held], layout))
    bound = np.asarray(candidates.key_values(keys[:, held:], np.inf))
    # what a key stands for: NaN as -inf (stage 5), infinities clamped, subnormals flushed (this CPU)
    clean = np.where(np.isnan(x), -np.inf, x)
    stood = np.clip(np.where(np.abs(clean) < candidates.TINY, 0.0, clean), -limit, limit).astype(np.float32)
    want_values, _, want_third = _expected_candidates(stood, layout)
    rows = [r for r in range(16) if r not in with_nan]
    floor = lambda a: np.maximum(a, -limit)  # noqa: E731  (an empty slot is -inf, a -inf logit -KEY_LIMIT)
    np.testing.assert_array_equal(floor(values[rows]), floor(want_values[rows]))
    np.testing.assert_array_equal(floor(bound[rows]), floor(want_third[rows]))
    for r in with_nan:
        assert bound[r].max() == np.inf

    def check_ids(r, values_r, ids_r):
        normal = (np.abs(values_r) >= candidates.TINY) & (values_r > -limit)
        assert (ids_r[normal] < vocab).all()
        np.testing.assert_array_equal(stood[r, ids_r[normal]], values_r[normal])
        assert len(set(ids_r[normal])) == normal.sum()
        assert ((ids_r < vocab) | (values_r == 0) | (values_r == -np.inf)).all()

    for r in range(16):
        check_ids(r, values[r], ids[r])

    folded = [np.asarray(a) for a in candidates.fold_keys(keys[:, :held], keys[:, held:], layout)]
    plain = [np.asarray(a) for a in candidates.fold(*(jnp.asarray(a) for a in (values, ids, bound)), layout)]
    np.testing.assert_array_equal(floor(folded[0][rows]), floor(plain[0][rows]))
    np.testing.assert_array_equal(floor(folded[2][rows]), floor(plain[2][rows]))
    for r in range(16):
        check_ids(r, folded[0][r], folded[1][r])
        assert (folded[1][r][folded[0][r] == -np.inf] == 0).all()
        kept = folded[1][r][(folded[1][r] < vocab) & (folded[0][r] > -np.inf)]
        outside = np.delete(stood[r], kept)  # (a zero whose id was lost still holds its slot's value)
        assert outside[outside != 0].max(initial=-np.inf) <= folded[2][r].max()
        assert not (outside == 0).any() or folded[2][r].max() >= 0 or (folded[0][r] == 0).any()


def test_the_two_deep_layout_widens_from_wide_vocab_and_top_p_alones_does_not():
    """Which column groups a layout takes: min(GROUPS, vregs) below WIDE_VOCAB and for top-p alone's
    deeper layout; WIDE_GROUPS for the two-deep layout from WIDE_VOCAB on. Each folds onto its own
    groups."""
    layout = candidates.ColumnLayout.of
    below, wide = layout(candidates.WIDE_VOCAB - 1), layout(candidates.WIDE_VOCAB)
    deep = layout(candidates.WIDE_VOCAB, candidates.TOP_P_DEPTH)
    assert (below.groups, wide.groups, deep.groups) == (candidates.GROUPS, candidates.WIDE_GROUPS, candidates.GROUPS)
    assert layout(1000).groups == 8  # fewer vregs than groups: one vreg a group
    assert (wide.fold_groups, deep.fold_groups) == (candidates.FOLD_GROUPS, candidates.TOP_P_FOLD_GROUPS)
    # the wider layout's scratch is the larger one: what `block_sizes.working_set` charges from WIDE_VOCAB on
    assert wide.scratch_bytes(16) > deep.scratch_bytes(16)


@pytest.mark.parametrize("sorted_levels", [True, False])
@pytest.mark.parametrize(
    ("vocab", "depth"),
    [(2048, 2), (9000, 2), (128256, 2), (9000, candidates.TOP_P_DEPTH), (140000, candidates.TOP_P_DEPTH)],
)
def test_the_fold_keeps_each_folded_lanes_largest_and_bounds_the_rest(vocab, depth, sorted_levels):
    """`candidates.fold` against numpy: each folded lane holds the FOLD_KEEP largest values (for top-p
    alone its own fold shape) of the candidates that fall on it (lane group j on j % fold_groups),
    largest first, each with the id of a candidate of that value falling there (which of equal values
    keeps its id is the fold's choice), and its bound is the largest of the others and of the third
    values folded onto it, so no value outside the folded candidates is above its row's largest bound.
    Ties, empty (-inf) slots and rows with fewer finite candidates than slots included; each column
    lane's levels sorted as the column pass leaves them, or not (candidates dropped to -inf, then
    `sorted_levels=False`); both the merging fold (`candidates.merges`) and the inserting one."""
    layout = candidates.ColumnLayout.of(vocab, depth)
    groups, keep = layout.fold_shape
    assert layout.fold_groups == groups == (candidates.FOLD_GROUPS if depth == 2 else candidates.TOP_P_FOLD_GROUPS)
    rng = np.random.default_rng(vocab)
    rows, n = 8, depth * layout.width
    values = np.round(rng.standard_normal((rows, n)) * 2).astype(np.float32)  # ties
    values[0, ::3] = -np.inf  # empty slots (a column holding fewer values, a dropped candidate)
    values[1] = -np.inf
    values[1, 7] = 1.0  # one finite candidate
    ids = rng.permutation(rows * n).reshape(rows, n).astype(np.int32)
    if sorted_levels:  # each column lane's levels largest first, its ids with them
        levels = values.reshape(rows, depth, layout.width)
        order = np.argsort(-levels, axis=1, kind="stable")
        values = np.take_along_axis(levels, order, axis=1).reshape(rows, n)
        ids = np.take_along_axis(ids.reshape(rows, depth, layout.width), order, axis=1).reshape(rows, n)
    third = np.minimum(np.round(rng.standard_normal((rows, layout.width)) * 2), values[:, : layout.width])
    third = third.astype(np.float32)
    folded = jax.jit(candidates.fold, static_argnums=(3, 4))(values, ids, third, layout, sorted_levels)
    got_v, got_i, got_b = (np.asarray(a) for a in folded)
    width = groups * 128
    assert got_v.shape == got_i.shape == (rows, keep * width) and got_b.shape == (rows, width)
    value_of = {(r, int(i)): v for r in range(rows) for i, v in zip(ids[r], values[r], strict=True)}
    for r in range(rows):
        for lane in range(width):
            falling = values[r, lane::width]
            want = np.sort(falling)[::-1]
            kept = got_v[r, lane::width]
            np.testing.assert_array_equal(kept, want[:keep])
            kept_ids = got_i[r, lane::width][np.isfinite(kept)]
            assert len(set(kept_ids.tolist())) == len(kept_ids)
            assert set(kept_ids.tolist()) <= set(ids[r, lane::width].tolist())
            assert all(value_of[r, int(i)] == v for i, v in zip(kept_ids, kept[np.isfinite(kept)], strict=True))
            want_bound = max([*want[keep:], *third[r, lane::width], -np.inf])
            assert got_b[r, lane] == want_bound
    # too few lane groups to shrink: the candidates as they are
    small = candidates.ColumnLayout.of(300)
    assert small.fold_groups is None
    same = candidates.fold(values[:, :768], ids[:, :768], third[:, :384], small)
    given = (values[:, :768], ids[:, :768], third[:, :384])
    assert all(np.array_equal(a, b) for a, b in zip(same, given, strict=True))


@pytest.mark.parametrize(("config", "vocab"), [("top_k", 1280), ("top_k", 1792), ("top_p", 2304), ("top_p", 3840)])
def test_column_group_counts_that_do_not_fold_evenly_are_sampled_unfolded(config, vocab):
    """Vocabularies whose column groups (10 or 14 a row for top-k's two-deep layout, 18 or 30 for top-p
    alone's) are no multiple of the folded groups (4, 8), though their candidates' lane groups are: the
    bounds could not fold evenly, so these are sampled unfolded (once a `fold` error on every call); kept
    sets and tokens are the reference's."""
    depth = 2 if config == "top_k" else candidates.TOP_P_DEPTH
    layout = candidates.ColumnLayout.of(vocab, depth)
    groups, _ = layout.fold_shape
    assert layout.groups % groups and not (depth * layout.groups) % groups and layout.fold_groups is None
    params = SamplingParams(temperature=1.0, **({"top_k": 50} if config == "top_k" else {"top_p": 0.9}))
    x = jax.random.normal(jax.random.key(8), (8, vocab)) * 3
    keys = jax.random.split(jax.random.key(9), 8)
    np.testing.assert_array_equal(
        np.asarray(sample(x, params, keys, impl="pallas")), np.asarray(sample(x, params, keys, impl="reference"))
    )
    kept = np.asarray(process_logits(x, params, impl="pallas")) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference")) > -np.inf)


def test_a_greedy_row_whose_maximum_ties_outside_the_folded_candidates_falls_back():
    """The fold keeps equal values in lane-group order, not vocabulary order: FOLD_KEEP + 1 tokens share
    a row's maximum and fall on one folded lane, the lowest id last, so the folded candidates hold the
    others. The greedy row's token (the first index of the maximum) is then not decided by the
    candidates: the block falls back, and the token is the reference's."""
    batch, vocab = 8, 12000
    layout = candidates.ColumnLayout.of(vocab)
    assert layout.groups == 32 and layout.fold_groups == 4
    x = np.array(jax.random.normal(jax.random.key(5), (batch, vocab))) * 0.1
    # lane 0 of columns 0, 4, 8, ... (their second vregs: ids 4096, 4608, 5120, ...) and of column 28 (its
    # first vreg: id 3584, the lowest): first-level lane groups 0, 4, 8, ... and 28, all on folded group 0
    maxima = [4096 + 4 * 128 * j for j in range(candidates.FOLD_KEEP)] + [3584]
    assert len(maxima) == len({(i // 128) % 32 for i in maxima}) and max(maxima) < 8192 - 128
    for i in maxima:
        x[0, i] = 5.0
    params = SamplingParams(temperature=np.array([0.0] + [1.0] * 7, np.float32), top_k=5)
    keys = jax.random.split(jax.random.key(6), batch)
    tokens, stats, _ = _launch(jnp.asarray(x), params, vocab, keys)
    assert tokens[0] == 3584
    assert stats[0, FALLBACK_COLUMN] > 0, "the block fell back to the whole-row path"
    np.testing.assert_array_equal(tokens, np.asarray(sample(jnp.asarray(x), params, keys, impl="reference")))


def _launch(x, case_params, vocab, keys, **kw):
    """The resident kernel on logits `x` with a verification config's parameters: (tokens, stats)."""
    from vsampler.core.inputs import prepare

    batch = x.shape[0]
    inp = prepare(x, case_params, keys, **kw)
    xs, rows, eos, allowed, config = pallas.kernel_operands(inp)
    plan = block_sizes.plan(batch, vocab, str(x.dtype), "v5e")
    assert plan.chunk is None
    out = jax.jit(functools.partial(pallas.tpu_launch, plan, config=config, interpret=True))(xs, rows, eos, allowed)
    return np.asarray(out[0])[:, 0], np.asarray(out[2]), config


FALLBACK_COLUMN = next(site.column for site in kernel.SITES if site.loop == "draw")


@pytest.mark.parametrize("config", ["top_k", "top_p", "combined", "min_p", "heterogeneous"])
def test_blocks_decided_by_the_candidates_and_blocks_that_fall_back_both_match_the_reference(config):
    batch, vocab = 16, 12000  # three or more values in most columns: values outside the candidates
    params = verification.params(config, batch, vocab)
    x = np.array(verification.logits("normal", batch, vocab, "float32", 1))
    # the second block's rows: one value across the whole row, so every column holds ties at the top-k
    # / min-p boundary outside its two candidates
    x[8:] = 1.0
    x = jnp.asarray(x)
    hist, prompt = verification.history(batch, vocab, 1)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": verification.EOS}
    keys = jax.random.split(jax.random.key(3), batch)
    tokens, stats, kernel_config = _launch(x, params, vocab, keys, **kw)
    assert kernel.uses_candidates(vocab, allowed=False, random=kernel_config.random, **kernel_config.filters)
    fell_back = stats[::8, FALLBACK_COLUMN] > 0
    assert fell_back[1], "the tied block falls back to the whole-row path"
    # the normal block is decided by its candidates (heterogeneous rows include temperature-only and
    # full-vocabulary top-p ones, which the candidates cannot bound: that block falls back too)
    assert fell_back[0] == (config == "heterogeneous")
    want = np.asarray(sample(x, params, keys, impl="reference", **kw))
    np.testing.assert_array_equal(tokens, want)
    kept = np.asarray(process_logits(x, params, impl="pallas", **kw)) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference", **kw)) > -np.inf)


def test_a_nan_in_a_top_p_alone_row_sends_its_block_to_the_whole_row_path():
    """Top-p alone on the candidates needs the whole row's mass (`candidates.row_mass`), which takes NaN
    into its sum instead of dropping it a vreg at a time: the row's target is then NaN, unmet, and its
    block falls back to the whole-row path, which drops NaN as stage 5 says. The block without NaN stays
    on the candidates; tokens and kept sets are the reference's in both."""
    batch, vocab = 16, 12000
    params = verification.params("top_p", batch, vocab)
    x = np.array(verification.logits("normal", batch, vocab, "float32", 2))
    x[11, ::97] = np.nan  # one row of the second block
    x = jnp.asarray(x)
    keys = jax.random.split(jax.random.key(4), batch)
    tokens, stats, _ = _launch(x, params, vocab, keys)
    fell_back = stats[::8, FALLBACK_COLUMN] > 0
    assert not fell_back[0] and fell_back[1]
    np.testing.assert_array_equal(tokens, np.asarray(sample(x, params, keys, impl="reference")))
    kept = np.asarray(process_logits(x, params, impl="pallas")) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference")) > -np.inf)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_top_p_alone_decides_on_the_candidates_with_as_many_kept_tokens_on_one_folded_lane_as_it_keeps(dtype):
    """Top-p alone's fold keeps `fold_shape`'s count (7 at this vocabulary) of the values falling on each
    folded lane: a row whose kept set puts that many on one lane (ties at the top, taken together) is
    decided on the candidates; one more on the same lane cannot be, and its block falls back. Tokens and
    kept sets are the reference's either way (float32: `fold`; bfloat16: `fold_keys`)."""
    vocab = 12000
    batch = 2 * block_sizes.sublane_rows(dtype)
    block_rows = block_sizes.plan(batch, vocab, dtype, "v5e").block_rows
    assert batch == 2 * block_rows  # two blocks: 8 rows each float32, 16 bfloat16
    layout = kernel.candidate_layout(vocab, kernel.KernelConfig(top_p=True, random=True))
    groups, keep = layout.fold_shape
    assert (layout.groups, layout.depth, layout.fold_groups, keep) == (32, 4, groups, 7)
    # one folded lane: lane 5 of vregs v with v % 8 == 1, spread over column groups 1, 9, 17 (at most 3
    # a column lane: each keeps its 4 largest before the fold)
    lane_vregs = [1, 33, 65, 9, 41, 73, 17, 49]
    x = np.array(verification.logits("normal", batch, vocab, "float32", 3))
    for row in range(batch):  # the first block: `keep` tied tokens, the second: one more
        count = keep if row < block_rows else keep + 1
        x[row, [v * 128 + 5 for v in lane_vregs[:count]]] = 20.0 + (row % 3)
    x = jnp.asarray(x, dtype)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    keys = jax.random.split(jax.random.key(6), batch)
    tokens, stats, _ = _launch(x, params, vocab, keys)
    fell_back = stats[::block_rows, FALLBACK_COLUMN] > 0
    assert list(fell_back) == [False, True]
    np.testing.assert_array_equal(tokens, np.asarray(sample(x, params, keys, impl="reference")))
    kept = np.asarray(process_logits(x, params, impl="pallas")) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference")) > -np.inf)
    assert (kept.sum(axis=1) == [keep] * block_rows + [keep + 1] * block_rows).all()


@pytest.mark.parametrize(("dtype", "batch"), [("float32", 8), ("bfloat16", 32)])
def test_top_p_alone_takes_the_rows_mass_from_the_column_pass_and_a_pass_only_where_that_cannot_stand(dtype, batch):
    """Top-p alone sums each row's exp(x / T) in its column pass (`candidates.FusedMass`; bfloat16 in
    every block, float32 where the block is its grid step's only one: B=8), so no block of ordinary rows
    runs the `row_mass` pass; a row whose maximum / T lies below FUSED_MASS_LOWEST (whose largest terms
    that sum could lose to underflow) or above FUSED_MASS_HIGHEST (where exp(-s_max) nears the subnormal
    range) sends its block through the pass. Tokens and kept sets are the reference's either way."""
    vocab = 12000
    block_rows = block_sizes.sublane_rows(dtype)
    assert kernel.fuses_row_mass(
        kernel.candidate_layout(vocab, kernel.KernelConfig(top_p=True, random=True)),
        kernel.KernelConfig(top_p=True, random=True),
        dtype,
        lone_block=batch == block_rows,
    )
    params = SamplingParams(temperature=0.7, top_p=0.9)
    keys = jax.random.split(jax.random.key(10), batch)
    row_mass_column = next(site.column for site in kernel.SITES if site.loop == "row_mass")
    for shifted_row in (None, batch - 3, 1):
        x = np.array(verification.logits("normal", batch, vocab, "float32", 9)) * 2
        if shifted_row == batch - 3:
            x[shifted_row] -= 200.0  # maximum / T below -40
        elif shifted_row == 1:  # maximum / T near 88: the sum finite, exp(-s_max) subnormal
            x[shifted_row] -= 30.0
            x[shifted_row, 5] = 61.5
        x = jnp.asarray(x, dtype)
        tokens, stats, _ = _launch(x, params, vocab, keys)
        want = [0] * (batch // block_rows)
        if shifted_row is not None:
            want[shifted_row // block_rows] = 1
        np.testing.assert_array_equal(stats[::block_rows, row_mass_column], want)
        np.testing.assert_array_equal(tokens, np.asarray(sample(x, params, keys, impl="reference")))
        kept = np.asarray(process_logits(x, params, impl="pallas")) > -np.inf
        np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference")) > -np.inf)


@pytest.mark.parametrize(("dtype", "filters"), [("float32", "top_k"), ("bfloat16", "top_k"), ("bfloat16", "top_p")])
def test_min_tokens_drops_eos_candidates_as_the_reference_masks_them(dtype, filters):
    """Stage 4 on the candidates (`candidates.drop_candidates`; top-p alone on bfloat16: on the keys, their
    ids decoded): an EOS id that is its column lane's largest value (and the row's), one that is its
    lane's second, in rows still too early (even rows) and rows past min_tokens; top-k 3 (or top-p 0.9
    alone) on sampled rows and a greedy row. Kept sets and tokens equal the reference's; where the
    candidates no longer decide, the block falls back, never a wrong token."""
    vocab, eos = 9000, (700, 1500)
    x = np.array(jax.random.normal(jax.random.key(11), (8, vocab))) * 3
    x[:, eos[0]] = 30.0  # the row's largest
    x[:, eos[1]] = 25.0
    x[:, eos[1] + 32 * 128] = 26.0  # the same column lane as eos[1], above it: eos[1] is the lane's second
    x = jnp.asarray(x, dtype)
    params = SamplingParams(
        temperature=np.array([1.0] * 7 + [0.0], np.float32),
        **({"top_k": 3} if filters == "top_k" else {"top_p": 0.9}),
        min_tokens=np.array([4, 0] * 4, np.int32),
    )
    history = jnp.full((8, 4), -1, jnp.int32).at[:, 0].set(1)
    kw = {"history": history, "prompt_len": 1, "eos_token_id": list(eos)}
    want = np.asarray(process_logits(x, params, impl="reference", **kw))
    got = np.asarray(process_logits(x, params, impl="pallas", **kw))
    np.testing.assert_array_equal(got, want)
    key = jax.random.key(12)
    np.testing.assert_array_equal(
        np.asarray(sample(x, params, key, impl="pallas", **kw)),
        np.asarray(sample(x, params, key, impl="reference", **kw)),
    )


@pytest.mark.parametrize(("config", "falls_back"), [("combined", [False, True]), ("top_p", [True, True])])
def test_bfloat16_nan_and_inf_logits_give_the_references_tokens(config, falls_back):
    """bfloat16 logits (16-row blocks) with NaN of either sign in one block, a +inf logit in the other.
    Combined filters (their penalties hand the kernel float32 logits): the column pass only compares (a
    NaN compares above nothing), so the candidates decide the NaN block, the NaN dropped as stage 5
    says, and the +inf sends the other block to the whole-row path. Top-p alone (bfloat16 into the
    kernel: `candidates.key_pass`'s keys, where a NaN spreads over its column lane and the lane's bound
    reads +inf; and the whole rows' mass, which a NaN makes NaN) falls back in that block as well.
    Tokens and kept sets are the reference's."""
    batch, vocab = 32, 12000
    params = verification.params(config, batch, vocab)
    x = np.array(verification.logits("normal", batch, vocab, "float32", 4))
    x[1, ::97] = np.nan
    x[2, ::89] = -np.nan
    x[3, 5:3000] = np.nan  # a quarter of the row
    x[20, 77] = np.inf
    x = jnp.asarray(x, jnp.bfloat16)
    hist, prompt = verification.history(batch, vocab, 4)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": verification.EOS}
    keys = jax.random.split(jax.random.key(7), batch)
    tokens, stats, _ = _launch(x, params, vocab, keys, **kw)
    np.testing.assert_array_equal(stats[::16, FALLBACK_COLUMN] > 0, falls_back)
    np.testing.assert_array_equal(tokens, np.asarray(sample(x, params, keys, impl="reference", **kw)))
    kept = np.asarray(process_logits(x, params, impl="pallas", **kw)) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference", **kw)) > -np.inf)


def test_bfloat16_rows_whose_keys_stand_ins_could_matter_fall_back_and_give_the_references_tokens():
    """The keys' stand-ins (`candidates` module comment on keys) on bfloat16 logits, a 16-row block each:
    0 a block they cannot touch (a thousand -inf logits in one row, far below its kept set): decided on
    the candidates; 1 kept zeros (subnormal keys: this CPU flushes them, codes lost); 2 a top-k reaching
    below the row's finite values (-inf read as -KEY_LIMIT); 3 logits and a temperature near 1e37, under
    which a -KEY_LIMIT logit weighs more than 0; 4 greedy rows whose maximum is 0; 5 a logit at
    +KEY_LIMIT (where +inf is read): each falls back to the whole-row path. Tokens and kept sets are the
    reference's in every row."""
    limit = candidates.KEY_LIMIT
    blocks, vocab = 6, 12000
    batch = 16 * blocks
    x = np.array(verification.logits("normal", batch, vocab, "float32", 5)) * 2
    temperature = np.full(batch, 0.8, np.float32)
    top_k = np.full(batch, 20, np.int32)
    top_p = np.full(batch, 0.9, np.float32)
    x[3, 100:1100] = -np.inf
    x[16:32] = np.minimum(x[16:32] - x[16:32].max(axis=1, keepdims=True), 0.0)  # each row's maximum is 0
    x[16:32, 500:503] = 0.0  # ties at the maximum: zeros kept
    x[32:48, 2:] = -np.inf  # two finite values, top-k 20
    temperature[32:48] = 2.0  # (below 1, -KEY_LIMIT / T overflows to -inf: a stand-in is then exactly -inf)
    x[48:64] *= 1e37  # spread as widely as the temperature: top-k still bounds the row's kept set
    x[48:64, 7] = -limit
    temperature[48:64] = 1e37
    x[64:80] = np.minimum(x[64:80] - x[64:80].max(axis=1, keepdims=True), 0.0)
    temperature[64:80] = 0.0
    x[80:96, 9] = limit
    x = jnp.asarray(x, jnp.bfloat16)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=np.float32(0.0))
    keys = jax.random.split(jax.random.key(8), batch)
    tokens, stats, kernel_config = _launch(x, params, vocab, keys)
    assert kernel.uses_candidates(vocab, allowed=False, random=kernel_config.random, **kernel_config.filters)
    np.testing.assert_array_equal(stats[::16, FALLBACK_COLUMN] > 0, [False] + [True] * (blocks - 1))
    np.testing.assert_array_equal(tokens, np.asarray(sample(x, params, keys, impl="reference")))
    kept = np.asarray(process_logits(x, params, impl="pallas")) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference")) > -np.inf)


@pytest.mark.parametrize(
    ("config", "tied_block"), [("top_k", 0), ("top_p", 0), ("combined", 0), ("top_p", 1), ("combined", 2)]
)
def test_a_group_samples_its_blocks_once_and_a_block_that_falls_back_reads_its_own_logits(config, tied_block):
    """`sampler_grouped`: three blocks of 8 rows a grid step (B=24), their candidates sampled once over
    the 24 rows. A block of tied rows falls back to the whole-row path on its own logits, copied again
    (reading another block's logits would give that block's tokens), and only its rows' outputs are
    rewritten. Only the tied block falls back; tokens and kept sets are the reference's."""
    batch, vocab = 24, 12000
    plan = block_sizes.plan(batch, vocab, "float32", "v5e")
    assert (plan.block_rows, plan.group_rows) == (8, 24)
    params = verification.params(config, batch, vocab)
    x = np.array(verification.logits("normal", batch, vocab, "float32", 1))
    x[tied_block * 8 : (tied_block + 1) * 8] = 1.0
    x = jnp.asarray(x)
    hist, prompt = verification.history(batch, vocab, 1)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": verification.EOS}
    keys = jax.random.split(jax.random.key(3), batch)
    tokens, stats, kernel_config = _launch(x, params, vocab, keys, **kw)
    assert sampler_grouped.takes(vocab, kernel_config, allowed=False)
    np.testing.assert_array_equal(stats[::8, FALLBACK_COLUMN] > 0, [b == tied_block for b in range(3)])
    np.testing.assert_array_equal(tokens, np.asarray(sample(x, params, keys, impl="reference", **kw)))
    kept = np.asarray(process_logits(x, params, impl="pallas", **kw)) > -np.inf
    np.testing.assert_array_equal(kept, np.asarray(process_logits(x, params, impl="reference", **kw)) > -np.inf)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_the_draws_points_cut_every_bracket_into_pieces_no_wider_than_its_pass_count_assumes(splits):
    """`candidates.draw_points` over every bracket width up to 2^21 (float32 steps) and a sample of wider
    ones up to 2^24 (integer division, V above `FLOAT_STEP_WIDTH`): the points rise within (lo, hi], and no piece
    of the bracket they leave is wider than ceil(w / (splits + 1)), the narrowing `sample`'s static
    pass count is computed from."""
    limit = candidates.FLOAT_STEP_WIDTH
    widths = np.arange(1, limit + 1, dtype=np.int32)
    for vocab, w in ((limit, widths), (limit + 1, np.random.default_rng(0).integers(1, 1 << 24, 1 << 16))):
        w = jnp.asarray(w, jnp.int32)
        lo = jnp.full_like(w, -1)
        hi = lo + w
        points = jax.jit(candidates.draw_points, static_argnums=(2, 3))(lo, hi, splits, vocab)
        edges = np.stack([np.asarray(lo), *map(np.asarray, points), np.asarray(hi)]).astype(np.int64)
        pieces = np.diff(edges, axis=0)
        assert (pieces >= 0).all() and (edges[1:-1] > edges[0]).all()
        assert (pieces.max(axis=0) <= -(-np.asarray(w, np.int64) // (splits + 1))).all()
