"""Layer Hessians ``H = 2 X Xᵀ`` and their damped Cholesky inverse (GPTQ, SparseGPT).

For a linear layer ``y = W x`` and the layer-wise objective ``||W X - Ŵ X||²`` over
calibration inputs ``X`` (``[in, tokens]``), the Hessian with respect to each row of ``W``
is ``H = 2 X Xᵀ`` (``[in, in]``), the same for every row (Frantar & Alistarh, 2022,
"Optimal Brain Compression"; Frantar et al., 2022, "GPTQ", eq. 1-2). GPTQ and SparseGPT
(Frantar & Alistarh, 2023) both need ``H⁻¹`` in upper Cholesky form: ``H⁻¹ = Uᵀ U``; the
row ``U[i, i:]`` is what the column-by-column update uses.

State (:class:`HessianAccumulator`) is separate from the math (the functions below).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from slmkit.errors import ConfigError
from slmkit.nn.surgery import linear_shape


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (restored after).

    GPTQ's and SparseGPT's column loops issue thousands of small tensor ops per layer. On
    two threads each op ends at an OpenMP barrier, and on a busy machine the second thread
    is often descheduled, so every op waits: on the built-in model's layers the loop ran
    several times slower on two threads than on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HessianAccumulator:
    """Running ``H = (2 / n) Σ x xᵀ`` over the inputs a linear layer sees.

    The mean (not the sum) keeps the scale independent of the number of tokens, so the
    relative dampening means the same thing for any calibration size.

    Args:
        in_features: the layer's input width.
        device: where to keep ``H`` (float32).

    Example::

        acc = HessianAccumulator(layer.in_features)
        with capture_linear_inputs({"l": layer}, lambda n, x: acc.add(x)):
            inputs.run(block)
        H = acc.hessian          # [in, in]
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu",
                 bf16: bool = False):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32,
                                   device=device)
        self.num_tokens = 0
        self.bf16 = bf16

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``x`` of shape ``[tokens, in]`` (or ``[..., in]``).

        With ``bf16`` (calibration forwards in bf16) the batch's ``XᵀX`` is one bf16
        matrix product, summed into the float32 ``H``: the inputs are the bf16 values the
        layer's own product reads in that mode, every product of two of them is exact and
        the sum over the batch runs in float32 inside the kernel; only the batch total is
        rounded to bf16 (relative 2⁻⁹ per entry, far below the sampling noise of ``H``
        from a few thousand tokens). On CPUs with AVX512-BF16 this is 2-3x faster than
        float32, and the down projection's 1536-wide Hessian is most of GPTQ's time.
        """
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device)  # [n, in]
        n = x.shape[0]
        if n == 0:
            return
        total = self.num_tokens + n
        self.hessian.mul_(self.num_tokens / total)
        if self.bf16:
            xb = x.to(torch.bfloat16)
            self.hessian.add_(torch.mm(xb.t(), xb).float(), alpha=2.0 / total)
        else:
            x = x.float() * (2.0 / total) ** 0.5
            self.hessian.addmm_(x.t(), x)  # [in, n] @ [n, in]
        self.num_tokens = total

    @classmethod
    def for_layer(cls, layer: nn.Module, bf16: bool = False) -> HessianAccumulator:
        """An accumulator sized for a Linear / Conv1D / QuantLinear ``layer``."""
        in_features = getattr(layer, "in_features", None) or linear_shape(layer)[1]
        return cls(in_features, device=next(layer.parameters(), torch.empty(0)).device,
                   bf16=bf16)


def hessian_reference(x: torch.Tensor) -> torch.Tensor:
    """Slow reference: ``2/n · Xᵀ X`` in float64 for ``x`` of shape ``[n, in]``."""
    x = x.double()
    return 2.0 / x.shape[0] * x.t() @ x


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Bool mask ``[in]`` of input channels that were always zero (``H[i, i] == 0``)."""
    return torch.diag(hessian) == 0


def damp_hessian(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``H + λ I`` with ``λ = damp · mean(diag H)``; dead inputs get ``H[i, i] = 1``.

    Args:
        hessian: ``[in, in]``.
        damp: relative dampening (GPTQ's ``percdamp``; 0.01 is the paper's default).

    Returns:
        A new ``[in, in]`` float32 matrix.
    """
    if not 0 <= damp < 1:
        raise ConfigError(f"--damp {damp} is out of range; use a small fraction such as "
                          "0.01 (0 <= damp < 1).")
    h = hessian.clone().float()
    dead = dead_inputs(h)
    h[dead, dead] = 1.0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    return h


def cholesky_inverse_upper(hessian: torch.Tensor, damp: float = 0.01,
                           max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the damped inverse Hessian: ``(H + λI)⁻¹ = Uᵀ U``.

    If the damped Hessian is not positive definite (numerically), the dampening is
    multiplied by 10 and retried, up to ``max_tries`` times.

    Args:
        hessian: ``[in, in]`` from :class:`HessianAccumulator`.
        damp: relative dampening, see :func:`damp_hessian`.

    Returns:
        ``U`` of shape ``[in, in]``, upper triangular, float32.
    """
    d = damp
    n = hessian.shape[0]
    rev = torch.arange(n - 1, -1, -1)
    for _ in range(max_tries):
        h = damp_hessian(hessian, min(d, 0.99)).double()
        # The reversed matrix's lower factor, reversed back, is an upper R with H = R Rᵀ;
        # then H⁻¹ = R⁻ᵀ R⁻¹, so U = R⁻¹. One factorization and one triangular inverse
        # instead of forming H⁻¹ (torch's cholesky_inverse takes seconds at n = 1536 on
        # CPU, 10x this) and factoring it again; the same U to ~1e-15.
        lower, info = torch.linalg.cholesky_ex(h[rev][:, rev])
        if int(info) == 0:
            r = lower[rev][:, rev]                               # upper, H = R Rᵀ
            eye = torch.eye(n, dtype=r.dtype)
            return torch.linalg.solve_triangular(r, eye, upper=True).float()
        d = max(d * 10, 1e-4)
    raise ConfigError("The calibration Hessian is not positive definite even with strong "
                      "dampening; use more calibration samples or a larger --damp.")
