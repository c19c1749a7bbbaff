"""The one tolerance table: every test and the main job's checks read it.

It lives in the package (not only in tests/) so that ``python -m blocksparse_moe`` can check
an installed layer with the same bounds the tests use; ``tests/tolerances.py`` re-exports it.

References are computed in float64 from the *already rounded* inputs, so the error left is
the op's own: the fp32 accumulation over K terms and the rounding of the output to its
dtype. Inputs in tests are scaled so outputs are O(1) (unit-variance entries, 1/sqrt(K)
scaling), which makes an absolute term meaningful.

Two kinds of check read this module:

* ``TOL[(kind, dtype)] = (rtol, atol)``: ``|out - ref| <= atol + rtol * |ref|`` elementwise.
* :func:`rounded_once_bound`: the exact promise of an op that accumulates in fp32 and rounds
  once, ``|out - round(ref)| <= 1 ulp + gamma_K * (|a| @ |b|)``; it catches a second rounding
  that the ``TOL`` entries (which allow 2 unit roundoffs relative plus an absolute term) let
  pass.

The arithmetic, with ``u`` the unit roundoff (half the spacing of the numbers in [1, 2)):
``u64 = 2^-53``, ``u32 = 2^-24 ~ 6.0e-8``, ``u16 = 2^-11 ~ 4.9e-4`` (fp16),
``ubf = 2^-8 ~ 3.9e-3`` (bf16). Rounding ``x`` once to a dtype moves it by at most ``u |x|``
(normal range). A K-term dot product summed in a dtype of unit roundoff ``u`` is off by at
most ``gamma_K * sum_k |a_k b_k|``, ``gamma_K = K u / (1 - K u)`` (Higham, Accuracy and
Stability of Numerical Algorithms, eq. 3.5), whatever the order of the sum; for random
data the error is a random walk, ~``sqrt(K) u sqrt(sum_k (a_k b_k)^2)``, i.e. about
``sqrt(K) u`` for an O(1) result whose terms are O(1/sqrt(K)).
"""

import torch

# unit roundoff u per dtype: the largest relative error of one rounding (normal range).
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}
# explicit mantissa bits and smallest normal exponent: the spacing of the numbers (ulp).
_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
_MIN_EXPONENT = {torch.float64: -1022, torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}

TOL = {
    # -- one op: a product, a permute, an activation, or the gradient of one ---------------
    # fp64 (CPU path only): gamma_K for K <= 512 is 512 * 2^-53 = 5.7e-14 of sum|a_k b_k|,
    # which is <= ~25 for O(1) outputs: <= 1.4e-12. 1e-10 leaves 70x for longer sums.
    ("op", torch.float64): (1e-10, 1e-10),
    # fp32: the random-walk accumulation error sqrt(K) u32 = sqrt(512) * 6e-8 = 1.4e-6 for
    # K <= 512; inputs are exact (already fp32) and the output is not rounded again.
    # 1e-5 is 7x that (the worst-case gamma_K bound, 3e-5 * sum|ab|, is never approached
    # by random data; an error of any real bug -- a missed block, a wrong row -- is O(1)).
    ("op", torch.float32): (1e-5, 1e-5),
    # fp16: one rounding of the output, <= u16 |y| = 4.9e-4 |y|, plus the fp32 accumulation
    # before it (<= 1.4e-6 absolute, above) and fp16's subnormal spacing 2^-24 = 6e-8 near
    # zero. rtol = 2 u16 = 9.8e-4 (an accumulation error may carry a value across a rounding
    # boundary: one more rounding step at most); atol = 1e-5 covers the absolute terms 7x.
    ("op", torch.float16): (2.0 ** -10, 1e-5),
    # bf16: the same with u_bf = 2^-8 = 3.9e-3: rtol = 2 u_bf = 7.8e-3, atol as for fp16
    # (bf16 has fp32's exponent range: no subnormal term at O(1) scales).
    ("op", torch.bfloat16): (2.0 ** -7, 1e-5),
    # -- a whole layer, or a gradient through it --------------------------------------------
    # The layer rounds three intermediates to the data dtype (hidden blocks h = x W1, the
    # activation act(h) * u, the expert output y = a W2) and sums them again: y carries
    # ~sqrt(3) u relative from its rounded inputs plus its own u; the activation's slope
    # (|act'| <= 1.13 for gelu, 1.1 for silu) and the GLU product pass the error of h on;
    # gradients repeat the chain backwards (dh through act', then dW = x^T dh sums T rows).
    # That is ~5 u relative per element, and the largest of thousands of elements sits at
    # ~3-4 standard deviations: 15-20 u.
    # fp64: the same chain at u64 = 1.1e-16 is ~1e-13; 1e-9 is deliberately loose (still
    # 10^5 below the fp32 entry: an fp32 step inside an fp64 layer shows).
    ("layer", torch.float64): (1e-9, 1e-9),
    # fp32: each of the chained products adds sqrt(K) u32 ~ 1e-6 (K = H, F or T <= 512), the
    # router's softmax and renormalisation a few u32; a weight gradient sums T rows of two
    # such errors: ~sqrt(T) * 2e-6 ~ 4e-5 at T = 300 (the GPU cases). 1e-4 leaves 2.5x.
    ("layer", torch.float32): (1e-4, 1e-4),
    # fp16: 20 u16 = 20 * 4.9e-4 = 9.8e-3 -> 1e-2.
    ("layer", torch.float16): (1e-2, 1e-2),
    # bf16: 15 u_bf = 15 * 3.9e-3 = 5.9e-2 -> 6e-2.
    ("layer", torch.bfloat16): (6e-2, 6e-2),
}


# -- FP8 experts (blocksparse_moe/fp8.py): relative Frobenius error of the output against a
# float64 reference that quantizes exactly as the format says (x and a per 1x128 group, the
# weights per 128x128 block). Both compute the same quantized operands, so what is left is
# the fp32 accumulation (~1e-6) and the rounding of h and of the output to x's dtype: 2^-9
# rms for bf16 (u_bf / sqrt(3) per element), and an element of a whose fp8 rounding a
# rounding of h moved by one e4m3 step (2^-4 relative, rare): measured 0.16-0.26% in bf16.
# Issue 19's bound, 1e-2, leaves 4x; a skipped quantization of x or a is 2-4% (tested).
FP8_FROBENIUS = 1e-2


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at ``|x|`` (float64): ``2^(e - p)`` for ``|x|`` in
    ``[2^e, 2^(e+1))`` with ``p`` mantissa bits, and the subnormal spacing below the smallest
    normal number (also at 0)."""
    x = x.detach().to(torch.float64).abs()
    _, exponent = torch.frexp(x)  # x = m 2^exponent, m in [0.5, 1): floor(log2 x) = exponent - 1
    e = torch.clamp(exponent - 1, min=_MIN_EXPONENT[dtype])
    return torch.ldexp(torch.ones_like(x), e - _MANTISSA_BITS[dtype])


def accumulation_bound(terms: int, magnitude: torch.Tensor, acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``gamma_K * magnitude``: the most a ``terms``-long sum in ``acc_dtype`` can be off, for
    ``magnitude = sum_k |a_k b_k|`` (the same product on the absolute values, float64)."""
    u = UNIT_ROUNDOFF[acc_dtype]
    gamma = terms * u / (1.0 - terms * u)
    return gamma * magnitude.detach().to(torch.float64)


def rounded_once_bound(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, *, terms: int = 0,
                       magnitude=None):
    """``(error, allowed)``, float64 tensors: ``error = |actual - round_dtype(reference)|`` and
    ``allowed = ulp + gamma_terms * magnitude``.

    An op that accumulates in fp32 and rounds once to ``dtype`` returns ``round(acc)`` with
    ``|acc - ref| <= delta = gamma_K * sum_k |a_k b_k|``; so ``|out - round(ref)| <= |out - acc|
    + |acc - ref| + |ref - round(ref)| <= 1/2 ulp + delta + 1/2 ulp``. The ulp is taken at the
    larger of the two values (they may straddle a power of two). A second rounding to
    ``dtype`` anywhere on the way (of a partial sum, of a weighted term) adds up to 1/2 ulp
    more per rounding, which some element of a few hundred shows.
    """
    ref = reference.detach().to(torch.float64)
    rounded = ref.to(dtype).to(torch.float64)
    got = actual.detach().to("cpu", torch.float64)
    rounded = rounded.cpu()
    allowed = ulp(torch.maximum(got.abs(), rounded.abs()), dtype)
    if magnitude is not None and terms:
        allowed = allowed + accumulation_bound(terms, magnitude).cpu()
    return (got - rounded).abs(), allowed
