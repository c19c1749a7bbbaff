"""SparseMatrix (blocksparse_moe/matrix.py): shape, transpose flag, dense form, checks."""

import pytest
import torch

from blocksparse_moe.matrix import SparseMatrix
from product_cases import arbitrary_topology, dense_blocks, randn
from tolerances import assert_close


def _matrix(dtype=torch.float64):
    topo = arbitrary_topology()  # 64 x 80, b = 16, 7 blocks
    return SparseMatrix(topo, randn((topo.nnz, 16, 16), dtype, "cpu"))


def test_to_dense_places_each_block():
    s = _matrix()
    dense = s.to_dense()
    topo = s.topology
    for n in range(topo.nnz):
        r, c = int(topo.row_indices[n]) * 16, int(topo.column_indices[n]) * 16
        assert torch.equal(dense[r:r + 16, c:c + 16], s.data[n])
    assert int((dense != 0).sum()) == topo.nnz * 256  # nothing outside the stored blocks
    assert torch.equal(dense != 0, topo.to_dense_mask())


def test_transpose_is_a_flag():
    s = _matrix()
    st = s.t()
    assert st.transposed and not s.transposed and st.data is s.data and st.topology is s.topology
    assert st.shape == (80, 64) and s.shape == (64, 80)
    assert torch.equal(st.to_dense(), s.to_dense().t())
    assert st.t().transposed is False


def test_transposed_metadata_lists_blocks_column_by_column():
    # The products read S^T through column_indices_t / offsets_t / block_offsets_t: check
    # that this walk reproduces S^T's dense form.
    s = _matrix()
    topo = s.topology
    dense_t = torch.zeros(80, 64, dtype=s.dtype)
    for col in range(topo.block_columns):
        for i in range(int(topo.offsets_t[col]), int(topo.offsets_t[col + 1])):
            row = int(topo.column_indices_t[i])
            dense_t[col * 16:(col + 1) * 16, row * 16:(row + 1) * 16] = s.data[int(topo.block_offsets_t[i])].t()
    assert torch.equal(dense_t, s.t().to_dense())


def test_properties_and_with_data():
    s = _matrix(torch.bfloat16)
    assert (s.block_size, s.nnz, s.dtype, s.device) == (16, 7, torch.bfloat16, torch.device("cpu"))
    d = torch.zeros_like(s.data)
    st = s.t().with_data(d)
    assert st.transposed and st.data is d and st.topology is s.topology
    assert "transposed=True" in repr(st)


def test_to_dense_is_differentiable():
    s = _matrix()
    data = s.data.clone().requires_grad_(True)
    w = randn((64, 80), torch.float64, "cpu", seed=1)
    (g,) = torch.autograd.grad((s.with_data(data).to_dense() * w).sum(), data)
    assert_close(g, dense_blocks(w, s.topology), torch.float64)  # d(sum(dense * w))/d data = w's blocks


def test_rejects_inconsistent_data():
    topo = arbitrary_topology()
    with pytest.raises(ValueError, match=r"SparseMatrix: data has shape \(7, 32, 32\) but the topology needs "
                                         r"\(nnz=7, 16, 16\)"):
        SparseMatrix(topo, torch.zeros(7, 32, 32))
    with pytest.raises(ValueError, match=r"data has shape \(6, 16, 16\)"):
        SparseMatrix(topo, torch.zeros(6, 16, 16))
    with pytest.raises(TypeError, match="SparseMatrix: data must be one of"):
        SparseMatrix(topo, torch.zeros(7, 16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="SparseMatrix: data is on meta but the topology is on cpu"):
        SparseMatrix(topo, torch.zeros(7, 16, 16, device="meta"))
    with pytest.raises(TypeError, match="SparseMatrix: topology must be a Topology"):
        SparseMatrix(None, torch.zeros(7, 16, 16))
    with pytest.raises(TypeError, match="SparseMatrix: transposed must be a bool"):
        SparseMatrix(topo, torch.zeros(7, 16, 16), transposed=1)
