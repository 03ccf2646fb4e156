"""The fused kernel compiles for real TPUs through libtpu's deviceless AOT (the `tpu` extra), with
the VMEM it uses read from the compiled executable and within the limit the policy set; its GPU
variant lowers to Triton for CUDA (jax.export, no GPU needed)."""

import pytest
from vsampler.kernels import block_sizes, candidates

compile_check = pytest.importorskip("vsampler.tools.compile_check")

REPRESENTATIVE = [  # (batch, vocab, dtype)
    (1, 32000, "float32"),
    (8, 50257, "bfloat16"),
    (64, 128256, "float32"),
    (64, 152064, "bfloat16"),
    (256, 256000, "bfloat16"),
]


@pytest.fixture(scope="module")
def libtpu():
    try:
        compile_check.tpu_device("v5e")
    except compile_check.TpuCompilerUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.slow
@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize(("batch", "vocab", "dtype"), REPRESENTATIVE)
def test_kernel_compiles_for_tpu(libtpu, generation, batch, vocab, dtype):
    result = compile_check.compile_tpu(generation, batch, vocab, dtype)
    assert result.ok, result.error
    assert 0 < result.vmem_used_bytes <= result.vmem_limit_bytes
    # one call moves the logits once (lane and sublane padding aside), plus a few bytes per row
    assert result.logits_bytes <= result.hbm_bytes <= 1.02 * result.logits_bytes + 64 * 1024


def test_policy_picks_the_chunked_variant_where_the_resident_block_does_not_fit():
    resident = block_sizes.plan(64, 32000, "float32", "v4")
    assert resident.chunk is None and resident.working_set_bytes <= resident.vmem_limit_bytes
    double = block_sizes.plan(64, 128256, "float32", "v4")  # 8 x 128256 resident needs ~28 MiB
    assert (double.chunk, double.buffers) == (block_sizes.CHUNK, 2)
    single = block_sizes.plan(64, 256000, "bfloat16", "v4", allowed=True)  # two copies: ~16 MiB
    assert (single.chunk, single.buffers) == (block_sizes.CHUNK, 1)
    assert single.working_set_bytes <= single.vmem_limit_bytes <= block_sizes.TPU_GENERATIONS["v4"].vmem_budget
    assert block_sizes.plan(64, 256000, "float32", "v5e").chunk is None


def test_policy_refuses_what_does_not_fit_with_the_numbers():
    with pytest.raises(ValueError, match=r"needs \d+\.\d MiB of VMEM resident and \d+\.\d MiB chunked, over v4's"):
        block_sizes.plan(64, 1_000_000, "float32", "v4")
    with pytest.raises(ValueError, match="unknown TPU generation"):
        block_sizes.plan(8, 1000, "float32", "v9")
    small = block_sizes.plan(3, 1000, "bfloat16", "v5e")
    assert (small.block_rows, small.padded_batch) == (3, 3)
    big = block_sizes.plan(20, 1000, "bfloat16", "v5e")
    assert (big.block_rows, big.padded_batch) == (16, 32)


def test_float32_batches_take_two_sublane_tiles_a_block_where_they_fit_with_room():
    assert block_sizes.plan(64, 128256, "float32", "v5e").block_rows == 16
    assert block_sizes.plan(16, 128256, "float32", "v5e").block_rows == 8  # a batch under 4 tiles
    assert block_sizes.plan(64, 128256, "float32", "v5p").block_rows == 8  # over 60% of v5p's budget
    assert block_sizes.plan(64, 256000, "float32", "v6e").block_rows == 8
    assert block_sizes.plan(64, 128256, "float32", None).block_rows == 8  # interpret: the tile
    assert block_sizes.plan(64, 128256, "bfloat16", "v5e").block_rows == 16


@pytest.mark.parametrize(
    ("batch", "vocab", "dtype"),
    [(1, 1000, "float32"), (8, 50257, "bfloat16"), (64, 128256, "float32"), (256, 256000, "bfloat16")],
)
def test_triton_variant_lowers_for_cuda(batch, vocab, dtype):
    result = compile_check.lower_triton(batch, vocab, dtype)
    assert result.ok, result.error
    assert result.kernels == 1  # one fused launch
    assert result.chunk & (result.chunk - 1) == 0  # power-of-two chunks


@pytest.mark.slow
@pytest.mark.parametrize(
    ("generation", "batch", "vocab", "dtype"), [("v5e", 8, 128256, "float32"), ("v6e", 64, 50257, "bfloat16")]
)
def test_kernel_with_mask_and_logprobs_compiles_for_tpu(libtpu, generation, batch, vocab, dtype):
    """The serving entry: the packed allowed-token mask unpacked on chip and 20 log-prob entries; the mask
    is read once (ceil(V / 32) words a row) and the outputs stay a few bytes a row."""
    result = compile_check.compile_tpu(generation, batch, vocab, dtype, allowed=True, top_n=20)
    assert result.ok, result.error
    assert 0 < result.vmem_used_bytes <= result.vmem_limit_bytes
    mask_bytes = batch * -(-vocab // 32) * 4
    extra = 1.02 * result.logits_bytes + mask_bytes + 64 * 1024
    assert result.logits_bytes + mask_bytes <= result.hbm_bytes <= extra


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("stages", ["full", "top_p alone"])
def test_v4_groups_hold_their_sampling_stage_within_the_limit(libtpu, stages):
    """v4's 14 MiB limit at B=256, V=32000, float32: the resident kernel's groups of 8-row blocks, sized
    with their sampling stage's temporaries (`block_sizes.group_stage_bytes`), compile within it: a
    128-row group (`full`) and a 64-row deep group (top-p alone) were over it."""
    plan = block_sizes.plan(256, 32000, "float32", "v4")
    assert plan.chunk is None and (plan.group_rows, plan.deep_group_rows) == (64, 32)
    kw = {} if stages == "full" else {"top_k": False, "min_p": False, "min_tokens": False}
    result = compile_check.compile_tpu("v4", 256, 32000, "float32", **kw)
    assert result.ok, result.error
    assert 0 < result.vmem_used_bytes <= result.vmem_limit_bytes


@pytest.mark.parametrize(
    ("batch", "vocab", "dtype", "serving"),
    [(1, 128256, "float32", False), (64, 152064, "bfloat16", False), (256, 256000, "float32", True)],
)
def test_chunked_variant_compiles_for_v4(libtpu, batch, vocab, dtype, serving):
    """v4's 16 MiB of VMEM: the policy's chunked variant, compiled for real, within its limit and still one
    read of the logits (and of the mask) a call."""
    kw = {"allowed": True, "top_n": 20} if serving else {}
    result = compile_check.compile_tpu("v4", batch, vocab, dtype, **kw)
    assert result.ok, result.error
    assert result.chunk == block_sizes.CHUNK
    assert 0 < result.vmem_used_bytes <= result.vmem_limit_bytes
    mask_bytes = batch * -(-vocab // 32) * 4 if serving else 0
    floor = result.logits_bytes + mask_bytes
    assert floor <= result.hbm_bytes <= 1.02 * floor + 64 * 1024


@pytest.mark.parametrize(("batch", "vocab", "dtype"), [(8, 50257, "bfloat16"), (64, 128256, "float32")])
def test_triton_variant_with_mask_and_logprobs_lowers_for_cuda(batch, vocab, dtype):
    result = compile_check.lower_triton(batch, vocab, dtype, allowed=True, top_n=20)
    assert result.ok, result.error
    assert result.kernels == 1


def test_the_resident_variant_takes_up_to_group_blocks_a_grid_step_where_they_divide_the_batch():
    """Blocks a grid step (`block_sizes.group_rows`): the most that divide the batch's blocks and fit; one
    block only where each TensorCore runs a single step; none where one-block steps would follow."""
    assert (block_sizes.GROUP_BLOCKS, block_sizes.DEEP_GROUP_BLOCKS) == (16, 8)
    plan = block_sizes.plan(64, 128256, "bfloat16", "v5e")
    assert (plan.group_rows, plan.deep_group_rows) == (64, 64)
    plan = block_sizes.plan(256, 128256, "float32", "v6e")  # 16 blocks: one grid step; top-p alone two
    assert (plan.group_for(2), plan.group_for(candidates.TOP_P_DEPTH), plan.step_rows) == (256, 128, 256)
    assert block_sizes.plan(24, 12000, "float32", "v5e").group_rows == 24  # 3 blocks of 8
    assert block_sizes.plan(80, 128256, "bfloat16", "v5e").group_rows == 80  # 5 blocks
    plan = block_sizes.plan(272, 128256, "bfloat16", "v5e")  # 17 blocks: none shares
    assert plan.group_rows is None and plan.deep_group_rows is None
    # one block: a step of its own, the grouped kernel copying it in parts (FIRST_COPY_PARTS)
    assert block_sizes.plan(8, 128256, "float32", "v5e").group_rows == 8
    assert block_sizes.plan(64, 128256, "float32", "v4").group_rows is None  # the chunked variant
    # the largest groups whose scratch fits beside the block: top-p alone's 8,192 folded candidates a
    # row over 256 rows would not, at V=256000 in bfloat16 on v5e
    wide = block_sizes.plan(256, 256000, "bfloat16", "v5e")
    assert (wide.group_rows, wide.deep_group_rows) == (256, 128)
    assert wide.working_set_bytes <= block_sizes.TPU_GENERATIONS["v5e"].vmem_budget
    deep = block_sizes.group_scratch_bytes(256, 256000, candidates.TOP_P_DEPTH)
    assert block_sizes.working_set(16, 256000, "bfloat16") + deep > block_sizes.TPU_GENERATIONS["v5e"].vmem_budget
    grouped = block_sizes.plan(64, 256000, "bfloat16", "v5e")
    assert grouped.working_set_bytes <= grouped.vmem_limit_bytes <= block_sizes.TPU_GENERATIONS["v5e"].vmem_budget
    # a megacore chip (v5p, v4) keeps a grid step for each of its two TensorCores
    assert block_sizes.plan(64, 128256, "bfloat16", "v5p").group_rows == 32
    assert block_sizes.plan(256, 128256, "bfloat16", "v5p").group_rows == 128
    assert block_sizes.plan(16, 128256, "bfloat16", "v5p").group_rows == 16  # one block, one step
    assert block_sizes.plan(3, 128256, "float32", "v5e").group_rows is None  # a block of 3 rows
    assert block_sizes.plan(8, 128256, "bfloat16", "v5e").group_rows is None  # half a bfloat16 tile
    assert block_sizes.plan(32, 128256, "bfloat16", "v5p").group_rows == 16  # a one-block step a TensorCore
