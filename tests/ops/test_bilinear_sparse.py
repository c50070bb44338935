"""ops._bilinear_sparse: the sparse products of the deformable CPU kernels against dense loops."""
import pytest
import torch

from convzoo.ops import _bilinear_sparse as sparse


def _problem(bags, points, num_rows, channels, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.randint(0, num_rows - max(steps), (bags, points), generator=generator, dtype=torch.int64)
    weights = [torch.randn(bags, points, generator=generator, dtype=torch.float64) for _ in range(4)]
    rows = torch.randn(num_rows, channels, generator=generator, dtype=torch.float64)
    grad_bags = torch.randn(bags, channels, generator=generator, dtype=torch.float64)
    return top_left, weights, rows, grad_bags


def _dense_matrix(top_left, steps, weights, num_rows):
    """A as a dense (bags, num_rows) matrix, built entry by entry (repeated rows add up)."""
    bags, points = top_left.shape
    dense = torch.zeros(bags, num_rows, dtype=torch.float64)
    for b in range(bags):
        for p in range(points):
            for k, step in enumerate(steps):
                dense[b, top_left[b, p] + step] += weights[k][b, p]
    return dense


@pytest.mark.parametrize("bags,points,num_rows,channels,steps", [
    (7, 1, 30, 5, (0, 1, 6, 7)),      # deformable conv: one sample per bag
    (5, 9, 40, 3, (0, 2, 12, 14)),    # DCNv3: P points per bag, groups interleaved
    (3, 4, 12, 2, (0, 1, 3, 4)),      # fewer table rows than entries per bag (4 * P = 16 > 12)
])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_products_match_the_dense_matrix(bags, points, num_rows, channels, steps, index_dtype):
    top_left, weights, rows, grad_bags = _problem(bags, points, num_rows, channels, steps)
    top_left = top_left.to(index_dtype)
    dense = _dense_matrix(top_left, steps, weights, num_rows)
    matrix = sparse.sampling_matrix(top_left, steps, weights, num_rows)
    torch.testing.assert_close(sparse.sample(matrix, rows), dense @ rows)

    dots = sparse.corner_dots(matrix, grad_bags, rows)
    assert dots.shape == (bags, 4, points)
    for k, step in enumerate(steps):
        want = (rows[top_left.long() + step] * grad_bags[:, None, :]).sum(-1)
        torch.testing.assert_close(dots[:, k], want)

    grad_rows = torch.ones(num_rows, channels, dtype=torch.float64)
    sparse.add_transposed_product(grad_rows, top_left, steps, weights, grad_bags)
    torch.testing.assert_close(grad_rows, 1 + dense.t() @ grad_bags)


def test_corner_dots_ignore_the_matrix_values():
    """The pattern's values never reach the dots, not even NaN (sampled_addmm reads them at beta=0)."""
    steps = (0, 1, 6, 7)
    top_left, weights, rows, grad_bags = _problem(6, 2, 30, 4, steps)
    nan_weights = [torch.full_like(w, float("nan")) for w in weights]
    got = sparse.corner_dots(sparse.sampling_matrix(top_left, steps, nan_weights, 30), grad_bags, rows)
    want = sparse.corner_dots(sparse.sampling_matrix(top_left, steps, weights, 30), grad_bags, rows)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_products_run_under_cpu_autocast():
    steps = (0, 1, 6, 7)
    top_left, weights, rows, grad_bags = _problem(6, 2, 30, 4, steps)
    weights, rows, grad_bags = [w.float() for w in weights], rows.float(), grad_bags.float()
    matrix = sparse.sampling_matrix(top_left, steps, weights, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampled = sparse.sample(matrix, rows)
        dots = sparse.corner_dots(matrix, grad_bags, rows)
        grad_rows = torch.zeros_like(rows)
        sparse.add_transposed_product(grad_rows, top_left, steps, weights, grad_bags)
    assert sampled.dtype == dots.dtype == grad_rows.dtype == torch.float32
    torch.testing.assert_close(sampled, matrix.to_dense() @ rows)
