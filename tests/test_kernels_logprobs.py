"""linear_logprobs / logprobs_from_logits: Triton kernels (TRITON_INTERPRET=1) and torch references
against a plain full-logits computation, values and gradients, fp32 and bf16, masked rows, odd shapes.

    pytest tests/test_kernels_logprobs.py
"""
import pytest
import torch

from cir_kernels import linear_logprobs, linear_logprobs_reference, logprobs_from_logits

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: NaN in masked lanes

# (dtype, atol, rtol) for values; gradients are compared relative to their largest entry.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-5)]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: the logit gradient is rounded to bf16
# (N, D, V, chunk_size, temperature): N = 1, D not a power of 2, V not a multiple of block or chunk
SHAPES = [(1, 5, 7, None, 1.0), (13, 24, 300, 64, 0.7), (37, 48, 257, 100, 1.3)]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert bool((err <= bound).all()), \
        f"{name}: max err {err.max():.3g}, mean err {err.mean():.3g}, atol {atol}, rtol {rtol}"


def naive(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), entropy


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n,d,v,chunk,temperature", SHAPES)
def test_linear_logprobs_matches_full_logits(backend, dtype, atol, rtol, n, d, v, chunk, temperature):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) > 0.3
    mask[0] = True
    if n > 2:
        mask[1] = False
        targets[1] = -100  # padding target on a masked row is never read
    grad_logp, grad_entropy = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    h1, w1 = leaves(hidden, weight)
    logp, entropy = linear_logprobs(h1, w1, targets, temperature, mask, True, chunk_size=chunk, backend=backend)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()

    h2, w2 = leaves(hidden, weight)
    ref_logp, ref_entropy = naive(h2.float() @ w2.float().t(), targets.clamp(min=0), temperature)
    ref_logp, ref_entropy = ref_logp * mask, ref_entropy * mask
    (ref_logp * grad_logp + ref_entropy * grad_entropy).sum().backward()

    assert logp.dtype == torch.float32 and logp.shape == (n,)
    assert_close("logp", logp, ref_logp, atol, rtol)
    assert_close("entropy", entropy, ref_entropy, atol, rtol)
    for name, got, want in (("grad_hidden", h1.grad, h2.grad), ("grad_weight", w1.grad, w2.grad)):
        assert got.dtype == dtype
        scale = want.abs().max().item()
        assert_close(name, got, want, GRAD_TOL[dtype] * scale, GRAD_TOL[dtype])
    assert bool((h1.grad[~mask] == 0).all()) and bool((logp[~mask] == 0).all())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_logprobs_plain_call_and_weight_only_grad(backend):
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(6, 12, generator=gen), torch.randn(50, 12, generator=gen)
    targets = torch.randint(0, 50, (6,), generator=gen)
    (w1,) = leaves(weight)
    logp = linear_logprobs(hidden, w1, targets, chunk_size=16, backend=backend)  # no mask, no entropy
    logp.sum().backward()
    (w2,) = leaves(weight)
    ref, _ = naive(hidden @ w2.t(), targets, 1.0)
    ref.sum().backward()
    assert_close("logp", logp, ref, 1e-5, 1e-5)
    assert_close("grad_weight", w1.grad, w2.grad, 1e-5, 1e-5)


def test_all_rows_masked_give_zeros():
    hidden, weight = torch.randn(3, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    logp = linear_logprobs_reference(hidden, weight, torch.zeros(3, dtype=torch.int64), mask=torch.zeros(3))
    logp.sum().backward()
    assert bool((logp == 0).all()) and bool((hidden.grad == 0).all()) and bool((weight.grad == 0).all())


def test_reference_keeps_no_logits_for_backward():
    """The CPU path must not keep [N, V] logits alive between forward and backward."""
    n, d, v = 37, 24, 300
    saved: list[int] = []
    hidden, weight = torch.randn(n, d, requires_grad=True), torch.randn(v, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_logprobs_reference(hidden, weight, torch.randint(0, v, (n,)), chunk_size=64)
    assert saved and max(saved) <= max(n * d, v * d), saved


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_logprobs_from_logits(backend, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(9, 333, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, 333, (9,), generator=gen)
    grad_logp, grad_entropy = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    (x1,) = leaves(logits)
    logp, entropy = logprobs_from_logits(x1, targets, 0.8, return_entropy=True, backend=backend)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    (x2,) = leaves(logits)
    ref_logp, ref_entropy = naive(x2, targets, 0.8)
    (ref_logp * grad_logp + ref_entropy * grad_entropy).sum().backward()
    assert_close("logp", logp, ref_logp, atol, rtol)
    assert_close("entropy", entropy, ref_entropy, atol, rtol)
    assert x1.grad.dtype == dtype
    scale = x2.grad.abs().max().item()
    assert_close("grad_logits", x1.grad, x2.grad, GRAD_TOL[dtype] * scale, GRAD_TOL[dtype])


def _bad_linear_calls():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.int64)
    return [
        ("hidden", dict(hidden=h.long())),
        ("hidden", dict(hidden=h[0])),
        ("weight", dict(weight=w.double())),
        ("weight", dict(weight=torch.randn(10, 7))),
        ("targets", dict(targets=t.float())),
        ("targets", dict(targets=t[:3])),
        ("targets", dict(targets=t + 10)),
        ("temperature", dict(temperature=0.0)),
        ("temperature", dict(temperature=-1.0)),
        ("mask", dict(mask=torch.ones(5))),
        ("chunk_size", dict(chunk_size=0)),
        ("backend", dict(backend="cuda")),
        ("fused", dict(backend="torch", fused=True)),
    ], dict(hidden=h, weight=w, targets=t)


@pytest.mark.parametrize("case", range(13))
def test_linear_logprobs_bad_input_names_argument(case):
    calls, good = _bad_linear_calls()
    name, bad = calls[case]
    with pytest.raises(ValueError, match=name):
        linear_logprobs(**{**good, **bad})


def test_logprobs_from_logits_bad_input_names_argument():
    logits, targets = torch.randn(4, 10), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="logits"):
        logprobs_from_logits(logits.t(), targets)  # last dim not contiguous
    with pytest.raises(ValueError, match="logits"):
        logprobs_from_logits(logits.long(), targets)
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(logits, targets[:2])
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(logits, targets - 1)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, targets, temperature=float("nan"))


@pytest.mark.parametrize("backend,fused", [("triton", True), ("triton", False), ("torch", False)])
def test_linear_logprobs_several_tiles_splits_and_chunks(backend, fused):
    """More rows than one 128-row tile, a hidden size of several K steps, a vocabulary of several
    forward splits and backward chunks: every tile-boundary and merge path of the fused GEMMs."""
    gen = torch.Generator().manual_seed(3)
    n, d, v = 203, 150, 1100
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) * 0.2
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[:5] = torch.tensor([0, v - 1, 127, 128, 1023])  # first / last column, tile and split edges
    mask = torch.rand(n, generator=gen) > 0.2
    targets[~mask] = -100
    grad_logp, grad_entropy = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    h1, w1 = leaves(hidden, weight)
    logp, entropy = linear_logprobs(h1, w1, targets, 0.9, mask, True, chunk_size=300, backend=backend, fused=fused)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    h2, w2 = leaves(hidden, weight)
    ref_logp, ref_entropy = naive(h2 @ w2.t(), targets.clamp(min=0), 0.9)
    (ref_logp * mask * grad_logp + ref_entropy * mask * grad_entropy).sum().backward()
    # fp32: sums over D = 150 and V = 1100 terms in another order than torch's
    assert_close("logp", logp, ref_logp * mask, 1e-4, 1e-5)
    assert_close("entropy", entropy, ref_entropy * mask, 1e-4, 1e-5)
    for name, got, want in (("grad_hidden", h1.grad, h2.grad), ("grad_weight", w1.grad, w2.grad)):
        assert_close(name, got, want, 1e-5 * want.abs().max().item(), 1e-4)
    assert bool((h1.grad[~mask] == 0).all())


@pytest.mark.parametrize("config", range(4))
def test_fused_gemms_with_each_cuda_tile_config(monkeypatch, config):
    """The tile configs CUDA autotunes over, run here through the interpreter (the autotuner needs a
    GPU): a vocabulary split that is not a multiple of BLOCK_N, partial row and K tiles."""
    import cir_kernels.linear_logprobs_triton as fused_gemms

    gen = torch.Generator().manual_seed(config)
    n, d, v = 150, 80, 700
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) * 0.2
    targets = torch.randint(0, v, (n,), generator=gen)
    grad_logp, grad_entropy = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    h2, w2 = leaves(hidden, weight)
    ref_logp, ref_entropy = naive(h2 @ w2.t(), targets, 1.0)
    (ref_logp * grad_logp + ref_entropy * grad_entropy).sum().backward()
    for specs in (fused_gemms._LSE_CONFIGS, fused_gemms._DZ_CONFIGS):
        m, n_cols, k = specs[config][:3]
        monkeypatch.setattr(fused_gemms, "_BLOCK_M", m)
        monkeypatch.setattr(fused_gemms, "_BLOCK_N", n_cols)
        monkeypatch.setattr(fused_gemms, "_BLOCK_K", k)
        h1, w1 = leaves(hidden, weight)
        logp, entropy = linear_logprobs(h1, w1, targets, return_entropy=True, chunk_size=300, backend="triton")
        (logp * grad_logp + entropy * grad_entropy).sum().backward()
        assert_close("logp", logp, ref_logp, 1e-4, 1e-5)
        assert_close("entropy", entropy, ref_entropy, 1e-4, 1e-5)
        for name, got, want in (("grad_hidden", h1.grad, h2.grad), ("grad_weight", w1.grad, w2.grad)):
            assert_close(name, got, want, 1e-5 * want.abs().max().item(), 1e-4)


def test_linear_logprobs_never_reads_the_device_back():
    """With check_targets=False (the training loop) a masked call makes no nonzero / item / bool."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
               torch.ops.aten.masked_select.default}

    class Count(TorchDispatchMode):
        calls: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncing:
                self.calls.append(func)
            return func(*args, **(kwargs or {}))

    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    targets, mask = torch.randint(0, 40, (9,)), torch.rand(9) > 0.5
    with Count() as count:
        logp, entropy = linear_logprobs(hidden, weight, targets, mask=mask, return_entropy=True, chunk_size=16,
                                        check_targets=False)
        (logp + entropy).sum().backward()
    assert count.calls == []
