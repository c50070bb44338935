"""ops._bilinear_rows: the Numba gather/scatter of the deformable conv CPU kernels (and its PyTorch
fallback without Numba) against loops over the samples."""
import pytest
import torch

from convzoo.ops import _bilinear_rows, _numba

STEPS = (0, 1, 6, 7)


def _problem(segments, per_segment, segment_rows, channels, seed=0):
    """Samples whose corners stay inside their segment's rows, as a batch element's do."""
    generator = torch.Generator().manual_seed(seed)
    count = segments * per_segment
    segment = torch.arange(count) // per_segment
    top_left = segment * segment_rows + torch.randint(0, segment_rows - max(STEPS), (count,), generator=generator)
    weights = [torch.randn(count, generator=generator, dtype=torch.float64) for _ in range(4)]
    rows = torch.randn(segments * segment_rows, channels, generator=generator, dtype=torch.float64)
    grad = torch.randn(count, channels, generator=generator, dtype=torch.float64)
    return top_left, weights, rows, grad


def _loops(top_left, weights, rows, grad):
    samples = torch.zeros(len(top_left), rows.shape[1], dtype=rows.dtype)
    dots = torch.zeros(len(top_left), 4, dtype=rows.dtype)
    grad_rows = torch.zeros_like(rows)
    for s in range(len(top_left)):
        for k, step in enumerate(STEPS):
            row = int(top_left[s]) + step
            samples[s] += weights[k][s] * rows[row]
            dots[s, k] = rows[row] @ grad[s]
            grad_rows[row] += weights[k][s] * grad[s]
    return samples, dots, grad_rows


@pytest.fixture(params=["numba", "pytorch"])
def path(request, monkeypatch):
    if request.param == "pytorch":
        monkeypatch.setattr(_bilinear_rows, "kernels", lambda name: None)
    return request.param


# (segments, samples per segment, first sample, threads): whole segments per thread, fewer segments
# than threads (private copies), a slice starting inside a segment, one thread.
@pytest.mark.parametrize("segments, per_segment, first, threads", [
    (4, 5, 0, 2), (1, 9, 0, 2), (3, 6, 4, 2), (3, 4, 0, 1)])
def test_sample_and_backward_match_loops(path, segments, per_segment, first, threads, monkeypatch):
    monkeypatch.setattr(_numba, "GRAIN", 1)  # let these tiny problems use every thread
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        top_left, weights, rows, grad = _problem(segments, per_segment, 12, 3)
        top_left, weights, grad = top_left[first:], [w[first:] for w in weights], grad[first:]
        want_samples, want_dots, want_grad_rows = _loops(top_left, weights, rows, grad)
        torch.testing.assert_close(_bilinear_rows.sample(rows, top_left, STEPS, weights), want_samples)
        grad_rows = torch.ones_like(rows)
        dots = _bilinear_rows.backward(rows, top_left, STEPS, weights, grad, grad_rows, segment=per_segment,
                                       segment_rows=12, first_sample=first)
        torch.testing.assert_close(dots, want_dots)
        torch.testing.assert_close(grad_rows, 1 + want_grad_rows)
    finally:
        torch.set_num_threads(previous)


def test_empty_sample_set(path):
    top_left, weights, rows, grad = _problem(1, 3, 12, 2)
    empty = top_left[:0]
    assert _bilinear_rows.sample(rows, empty, STEPS, [w[:0] for w in weights]).shape == (0, 2)
    grad_rows = torch.zeros_like(rows)
    dots = _bilinear_rows.backward(rows, empty, STEPS, [w[:0] for w in weights], grad[:0], grad_rows, 3, 12)
    assert dots.shape == (0, 4) and not grad_rows.any()
