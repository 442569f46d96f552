"""Random probe vectors for the stochastic estimators, drawn only from an explicit ``torch.Generator``.

Every estimator in :mod:`curvature.linalg` draws its probes here, so that one seed fixes every number it
returns. The draws happen on the CPU (a CPU generator gives the same stream on every machine) and are then
moved to the operator's device and dtype; to a CUDA device through pinned memory without blocking, so that
drawing the next probes never waits for the products queued on the GPU (a pageable copy would).
"""

from __future__ import annotations

import torch

from ._checks import check_generator

__all__ = ["DISTRIBUTIONS", "check_distribution", "gaussian", "probes", "rademacher", "resolve_generator"]

#: The probe distributions the stochastic estimators accept.
DISTRIBUTIONS = ("rademacher", "gaussian")


def check_distribution(distribution: str) -> None:
    """Check that ``distribution`` names one of :data:`DISTRIBUTIONS`.

    Raises:
        ValueError: If it does not.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator``, or for None a private copy of torch's global CPU generator.

    Estimators never consume the global random stream (computing curvature leaves the global RNG state as it
    was). With ``generator=None`` they draw from a copy of it instead: results are reproducible under
    ``torch.manual_seed``, and two calls with no random draws in between use the same probes. Pass a
    ``torch.Generator`` to control the stream explicitly.

    Args:
        generator: A generator or None.

    Returns:
        A generator to draw from.

    Raises:
        TypeError: If ``generator`` is neither.
    """
    check_generator(generator)
    if generator is not None:
        return generator
    private = torch.Generator()
    private.set_state(torch.get_rng_state())
    return private


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def rademacher(
    shape: tuple[int, ...] | int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw independent random signs ``±1`` with equal probability.

    Args:
        shape: The shape of the result.
        generator: The source of randomness; None uses torch's global generator.
        dtype: The floating dtype of the result.
        device: The device of the result.

    Returns:
        A tensor of ``±1`` entries.

    Example:
        >>> rademacher(4, torch.Generator().manual_seed(0)).abs().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    check_generator(generator)
    bits = torch.randint(0, 2, _shape(shape), generator=generator, device=_generator_device(generator))
    return _to_device((2 * bits - 1).to(dtype), device)


def gaussian(
    shape: tuple[int, ...] | int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw independent standard normal entries.

    Draws in float64 and casts, so that the float32 and float64 probes of one seed agree to float32
    rounding.

    Args:
        shape: The shape of the result.
        generator: The source of randomness; None uses torch's global generator.
        dtype: The floating dtype of the result.
        device: The device of the result.

    Returns:
        A tensor of standard normal entries.
    """
    check_generator(generator)
    draw = torch.randn(_shape(shape), generator=generator, dtype=torch.float64, device=_generator_device(generator))
    return _to_device(draw.to(dtype), device)


def probes(
    distribution: str,
    shape: tuple[int, ...] | int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw probe vectors from a named isotropic distribution (``E[v vᵀ] = I``).

    Args:
        distribution: ``"rademacher"`` (random signs: the lowest variance of Hutchinson's estimator for
            real probes, Hutchinson 1989) or ``"gaussian"``.
        shape: The shape of the result, typically ``(P, k)``.
        generator: The source of randomness; None uses torch's global generator.
        dtype: The floating dtype of the result.
        device: The device of the result.

    Returns:
        The probes.

    Raises:
        ValueError: If ``distribution`` is not one of the names above.
    """
    check_distribution(distribution)
    draw = rademacher if distribution == "rademacher" else gaussian
    return draw(shape, generator, dtype, device)


def _to_device(draw: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move ``draw`` to ``device``; from the CPU to CUDA asynchronously, through pinned memory.

    A copy from pageable host memory makes the host wait until the GPU has finished its queue; a copy from
    pinned memory with ``non_blocking=True`` is queued behind it instead, and the caching host allocator keeps
    the pinned buffer alive until the copy has run.
    """
    device = torch.device(device)
    if device.type == "cuda" and draw.device.type == "cpu":
        return draw.pin_memory().to(device, non_blocking=True)
    return draw.to(device)


def _shape(shape: tuple[int, ...] | int) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)
