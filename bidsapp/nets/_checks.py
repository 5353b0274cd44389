"""Argument checks shared by the network constructors (clear errors before any layer is built)."""

from __future__ import annotations

__all__ = ["check_int", "check_net_args"]


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value``, checked to be an int (not a bool) of at least ``minimum``.

    Parameters
    ----------
    name : str
        Names the argument in the error.
    value : object
        The argument.
    minimum : int, default 1
        Smallest accepted value.

    Returns
    -------
    int
        ``value`` unchanged.

    Raises
    ------
    TypeError
        When ``value`` is not an int (a bool is refused too).
    ValueError
        When ``value`` is below ``minimum``.

    Examples
    --------
    >>> check_int("depth", 0, minimum=0)
    0
    >>> check_int("in_channels", 0)
    Traceback (most recent call last):
    ...
    ValueError: in_channels must be >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_net_args(spatial_dims: int, dims: tuple[int, ...] = (2, 3), **counts: object) -> None:
    """Refuse a ``spatial_dims`` not in ``dims``, then each of ``counts`` that is not an int >= 1.

    Parameters
    ----------
    spatial_dims : int
        The network's spatial dimensions.
    dims : tuple of int, default (2, 3)
        The dimensions the network supports, ascending.
    **counts : object
        Channel, width and size arguments by name, checked in the order given.

    Raises
    ------
    ValueError
        An unsupported ``spatial_dims``, or a count below 1.
    TypeError
        A count that is not an int.

    Examples
    --------
    >>> check_net_args(3, in_channels=1, out_channels=1)
    >>> check_net_args(1, in_channels=1)
    Traceback (most recent call last):
    ...
    ValueError: spatial_dims must be 2 or 3, got 1
    """
    if spatial_dims not in dims:
        either = ", ".join(str(d) for d in dims[:-1]) + f" or {dims[-1]}"
        raise ValueError(f"spatial_dims must be {either}, got {spatial_dims!r}")
    for name, value in counts.items():
        check_int(name, value)
