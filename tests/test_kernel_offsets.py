"""int64 element offsets wherever an index times a stride can pass 2^31.

A Triton index is int32 unless made int64; ``row * stride`` then wraps silently once an
operand has 2^31 elements, which real layers reach. Two halves:

1. The arithmetic: the operands of the DeepSeek-V3 and Mixtral-8x7B expert layers at 64k
   tokens (block size 128, GLU, P at its static bound ``T*k + E*(b-1)``), and which of
   them have more than 2^31 elements, i.e. a largest element offset that int32 cannot hold.
2. The kernels: each kernel's index x stride products over a whole dimension (rows of a
   token or expert matrix, stored blocks, the columns N that dds's transposed views turn
   into a long strided dimension) are computed in int64, read from the kernel's TTIR as
   compiled for sm_90 with every stride a runtime value (no unit-stride specialization).
"""

import re

import pytest
import torch

import compile_targets as ct
from blocksparse_moe import backend

# The recorder runs the launchers under the interpreter, which conftest.py turns on only
# on machines without a GPU (bench/compile_report.py does the same sweep on a GPU machine).
needs_interpreter = pytest.mark.skipif(not backend.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
INT32_MAX = 2**31 - 1
TOKENS = 65536
BLOCK = 128

SHAPES = {
    "deepseek-v3": dict(hidden=7168, ffn=2048, experts=256, top_k=8),
    "mixtral-8x7b": dict(hidden=4096, ffn=14336, experts=8, top_k=2),
}


def operand_elements(hidden, ffn, experts, top_k, tokens=TOKENS, block=BLOCK):
    """Elements of every operand the expert path's kernels address (GLU: 2F gate+up)."""
    p = tokens * top_k + experts * (block - 1)  # padded rows: the layer's static bound
    return {
        "x [T, H]": tokens * hidden,
        "x_perm / y / their grads [P, H]": p * hidden,
        "h = gate|up blocks [P, E*2F] (nnz*b*b)": p * 2 * ffn,
        "act blocks [P, E*F]": p * ffn,
        "w1 / dw1 [E, 2F, H]": experts * 2 * ffn * hidden,
        "w2 / dw2 [E, F, H]": experts * ffn * hidden,
    }


# What int32 cannot address, per model: the largest offset is elements - 1.
OVER_INT32 = {
    "deepseek-v3": {"x_perm / y / their grads [P, H]", "h = gate|up blocks [P, E*2F] (nnz*b*b)",
                    "w1 / dw1 [E, 2F, H]", "w2 / dw2 [E, F, H]"},
    "mixtral-8x7b": {"h = gate|up blocks [P, E*2F] (nnz*b*b)"},
}


@pytest.mark.parametrize("model", SHAPES)
def test_which_operands_pass_int32(model):
    sizes = operand_elements(**SHAPES[model])
    over = {name for name, n in sizes.items() if n - 1 > INT32_MAX}
    assert over == OVER_INT32[model], {name: f"{n / 2**31:.2f} x 2^31" for name, n in sizes.items()}


# Per kernel, the stride arguments multiplied by an index that spans a whole dimension
# (the others meet only tile-local indices, < 128, against strides of one block or one K
# step, or advance a 64-bit pointer): each product must be int64.
LONG_STRIDES = {
    # rows of a (P or T), the expert group of b, the columns of b inside it (through a
    # transposed view a long stride), the stored block of out
    "_sdd_kernel": ("stride_am", "stride_bg", "stride_bn", "stride_on"),
    "_sdd_merged_kernel": ("stride_am", "stride_bg", "stride_bn", "stride_on"),
    # the stored block of data; group, rows (K = P for the dW products) and columns of b
    # (dds: N = a long dimension, stride_bn its row stride); rows and columns of out
    "_dsd_kernel": ("stride_dn", "stride_bg", "stride_bk", "stride_bn", "stride_om", "stride_on"),
    "_gather_kernel": ("stride_x", "stride_out", "stride_wt"),
    "_scatter_kernel": ("stride_y", "stride_out", "stride_wt"),
    "_scatter_wgrad_kernel": ("stride_dout", "stride_y"),
    "_glu_fwd_kernel": ("stride_g", "stride_u", "stride_o"),
    "_glu_bwd_kernel": ("stride_d", "stride_g", "stride_u", "stride_dg", "stride_du"),
    # The fused expert path (kernels/experts.py): the token of a gathered row (x, dout, the
    # top-k weights), the padded row, the expert, and the columns of a weight stack (a w1
    # seen through a [2F, E, H] buffer has a column stride of E*H), of dW and of x (rows of
    # the weight gradient's right operand run along H).
    "_up_kernel": ("stride_xt", "stride_we", "stride_wc", "stride_be", "stride_hr"),
    "_down_kernel": ("stride_ar", "stride_we", "stride_wn", "stride_be", "stride_gt", "stride_ys"),
    "_act_bwd_kernel": ("stride_dt", "stride_we", "stride_wf", "stride_be", "stride_gt", "stride_hr",
                        "stride_dhr", "stride_ar", "stride_pn", "stride_ps"),
    "_wgrad_kernel": ("stride_lr", "stride_st", "stride_sn", "stride_gt", "stride_de", "stride_dc", "stride_dn",
                      "stride_ble", "stride_bre", "stride_pp", "stride_pn", "stride_plp", "stride_prp"),
    # The split's second pass (kernels/expert_wgrad.py): the partial's position and columns of
    # the workspace [2X, C, N] (stored C-fastest: stride_pn = C), the expert and columns of dW.
    "_wgrad_sum_kernel": ("stride_de", "stride_dc", "stride_dn", "stride_ble", "stride_bre", "stride_pp",
                          "stride_pn", "stride_plp", "stride_prp"),
}

_SHAPE_OPS = ("arith.extsi", "tt.splat", "tt.broadcast", "tt.expand_dims")
_DEF = re.compile(r"^\s*(%[\w.]+) = ([\w.]+) (.*?)(?: loc\(|$)")


def narrow_products(ttir: str, stride: str):
    """The ``arith.muli`` lines of ``ttir`` that multiply ``%stride`` (or a splat, broadcast,
    sign extension of it) in 32 bits; must be empty."""
    derived, bad = {f"%{stride}"}, []
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        operands = set(re.findall(r"%[\w.]+", rest.split(":")[0]))
        if op in _SHAPE_OPS and operands & derived:
            derived.add(name)
        elif op == "arith.muli" and operands & derived:
            if not re.search(r":\s*(tensor<[\dx]*x)?i64>?\s*$", rest.split(" loc(")[0].strip()):
                bad.append(line.strip())
    return bad


def _generic(job):
    """``job`` with every stride a runtime i32 (undo Triton's specialization of 1)."""
    signature, constexprs = dict(job["signature"]), dict(job["constexprs"])
    for name in list(constexprs):
        if name.startswith("stride") and constexprs[name] == 1:
            signature[name] = "i32"
            del constexprs[name]
    return dict(job, signature=signature, constexprs=constexprs, keep_ttir=True, spec="generic")


@pytest.fixture(scope="module")
def ttirs():
    def workload():  # every kernel once, bf16, both sdd kernels (block 16 and 64)
        ct.default_workload(dtypes=(torch.bfloat16,), block_sizes=(16, 64))

    launches = ct.record(workload)
    jobs = {}
    for job in ct.jobs(launches, [90]):
        if job["constexprs"].get("SPLIT"):  # the weight gradient's split variant: all its products
            jobs[job["qualname"]] = _generic(job)
        jobs.setdefault(job["qualname"], _generic(job))
    return {r["qualname"]: r for r in ct.compile_jobs(list(jobs.values()))}


@needs_interpreter
@pytest.mark.parametrize("kernel", LONG_STRIDES)
def test_long_offsets_are_int64(ttirs, kernel):
    result = ttirs[kernel]
    assert result["ok"], result.get("error")
    for stride in LONG_STRIDES[kernel]:
        assert f"%{stride}:" in result["ttir"], f"{kernel} has no argument {stride}"
        assert narrow_products(result["ttir"], stride) == [], f"{kernel}: {stride} multiplied in 32 bits"


def test_narrow_product_check_fires():
    # The check itself, on the TTIR shape of today's bug (offs_n * stride_bn in i32).
    ttir = """
    %offs_n = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc1)
    %b_1 = tt.splat %stride_bn : i32 -> tensor<1x64xi32> loc(#loc2)
    %b_2 = arith.muli %b_0, %b_1 : tensor<1x64xi32> loc(#loc2)
    %c_1 = arith.extsi %stride_on : i32 to i64 loc(#loc3)
    %c_2 = tt.splat %c_1 : i64 -> tensor<1x64xi64> loc(#loc3)
    %c_3 = arith.muli %c_0, %c_2 : tensor<1x64xi64> loc(#loc3)
    """
    assert len(narrow_products(ttir, "stride_bn")) == 1
    assert narrow_products(ttir, "stride_on") == []
