"""Parsers of the run options given as text: ``--mesh`` layouts and ``--profile`` windows.

Imports nothing heavy, like :mod:`train.config`, which validates both with these.
"""

from __future__ import annotations

# Axes of the device mesh (``--mesh``): pure data parallelism, FSDP (parameters and
# optimizer state split along the model width, batch split too) and tensor parallelism
# (heads / MLP / vocabulary dimensions split). See train/mesh.py.
MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh(text: str) -> dict[str, int]:
    """Parses a ``--mesh`` layout such as ``"data=2,fsdp=4"``.

    Args:
      text: Comma-separated ``axis=size`` pairs; axes from ``MESH_AXES``, each at most
        once, sizes positive integers. ``""`` means no mesh.

    Returns:
      ``{axis: size}`` for every axis of ``MESH_AXES`` (size 1 where not given), or
      ``{}`` for ``""``.

    Raises:
      ValueError: Bad syntax, an unknown or repeated axis, or a size < 1.
    """
    text = text.strip()
    if not text:
        return {}
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, sep, size = (s.strip() for s in part.partition("="))
        if not sep or not name or not size:
            raise ValueError(
                f"Bad mesh {text!r}: expected comma-separated axis=size pairs such as "
                f"'data=2,fsdp=4', got {part.strip()!r}")
        if name not in MESH_AXES:
            raise ValueError(f"Bad mesh {text!r}: unknown axis {name!r}; expected one of: "
                             f"{', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"Bad mesh {text!r}: axis {name!r} is given twice")
        # isascii: str.isdigit also accepts '²' and other digits int() refuses.
        if not (size.isascii() and size.isdigit()) or int(size) < 1:
            raise ValueError(f"Bad mesh {text!r}: the size of {name!r} must be a positive "
                             f"integer, got {size!r}")
        sizes[name] = int(size)
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def parse_profile(text: str) -> tuple[int, int] | None:
    """Parses a ``--profile START:N`` window.

    Returns:
      ``(start, n)``: trace updates ``start + 1`` ... ``start + n`` (``start`` >= 0
      updates done before the trace starts, ``n`` >= 1), or ``None`` for ``""``.

    Raises:
      ValueError: Anything else.
    """
    text = text.strip()
    if not text:
        return None
    start, sep, count = (s.strip() for s in text.partition(":"))
    if not (sep and start.isascii() and start.isdigit() and count.isascii()
            and count.isdigit() and int(count) >= 1):
        raise ValueError(f"Bad profile window {text!r}: expected START:N with integers "
                         "START >= 0 and N >= 1, e.g. '10:5'")
    return int(start), int(count)
