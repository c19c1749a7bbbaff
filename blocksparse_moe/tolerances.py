"""The one tolerance table: every test and the main job's checks read it.

It lives in the package (not only in tests/) so that ``python -m blocksparse_moe`` can check
an installed layer with the same bounds the tests use; ``tests/tolerances.py`` re-exports it.

References are computed in float64 from the *already rounded* inputs, so the error left is
the op's own: fp32 accumulation over K terms and the final rounding of the output to its
dtype. Inputs in tests are scaled so outputs are O(1) (unit-variance entries, 1/sqrt(K)
scaling), which makes an absolute term meaningful.

    kind "op":     one product / permute. fp32: accumulation of ~K*eps32 relative, K <= 512.
                   fp16: one output rounding (2^-11 ~ 4.9e-4) dominates. bf16: one output
                   rounding (2^-8 ~ 3.9e-3) dominates.
    kind "layer":  a whole MoE layer or a gradient through it: two or three rounded
                   intermediates (hidden blocks, activation, expert output) feed further sums,
                   so the rounding of each intermediate is amplified by up to ~sqrt(F).
"""

import torch

TOL = {
    ("op", torch.float64): (1e-10, 1e-10),
    ("op", torch.float32): (1e-5, 1e-5),
    ("op", torch.float16): (2e-3, 2e-3),
    ("op", torch.bfloat16): (1.6e-2, 1.6e-2),
    ("layer", torch.float64): (1e-9, 1e-9),
    ("layer", torch.float32): (1e-4, 1e-4),
    ("layer", torch.float16): (1e-2, 1e-2),
    ("layer", torch.bfloat16): (6e-2, 6e-2),
}
