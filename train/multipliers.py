"""Relative-LR module tables: validation and ``--multipliers`` files.

A table is ``{"multipliers": {label or group: [start, end]}, "final_fraction": f}``: the
per-module start/end multipliers of ``llr_optax.relative_schedule`` and the base cosine's
final fraction. ``python -m train.search`` writes such files (with the ``lr`` it found);
``python -m train --method relative --multipliers FILE`` reads them. ``TrainConfig``
stores the validated content, so a resume under another table is refused.

No JAX here: the CLI validates a file before importing anything heavy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

# The module labels and groups a multiplier table may name: ``llr_optax.LABELS`` and
# ``llr_optax.LABEL_GROUPS`` (copied so this module imports no JAX; a test keeps them equal).
TABLE_KEYS = ("embed", "pos_embed", "head", "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv",
              "mlp_gate", "mlp_up", "mlp_down", "router", "expert", "norm", "bias", "other",
              "attn", "mlp")
# Optional run settings a multipliers file may carry besides the table (what
# ``python -m train.search`` found); the CLI uses them unless given explicitly.
MULTIPLIERS_FILE_SETTINGS = ("lr", "weight_decay")


def check_multipliers(values: Any, what: str = "multipliers") -> dict[str, Any]:
    """Validates a relative-schedule table and returns it normalised.

    Args:
      values: ``{"multipliers": {label or group: [start, end], ...}, "final_fraction":
        f}``: start/end multipliers (``relative_schedule``'s ``a_m``, ``b_m``), positive
        finite numbers; keys from :data:`TABLE_KEYS`; ``0 < f <= 1`` the base cosine's
        final LR as a fraction of its peak.
      what: Names the source in error messages (e.g. the file).

    Returns:
      ``{"multipliers": {key: [start, end]}, "final_fraction": f}`` with floats.

    Raises:
      ValueError: Anything else (one line).
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} must be a JSON object with \"multipliers\" and "
                         f"\"final_fraction\", got {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in ("multipliers", "final_fraction"))
    missing = [k for k in ("multipliers", "final_fraction") if k not in values]
    if unknown or missing:
        raise ValueError(f"{what}: expected the keys \"multipliers\" and \"final_fraction\""
                         + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + (f"; missing: {', '.join(missing)}" if missing else ""))
    table = values["multipliers"]
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{what}: \"multipliers\" must be a non-empty object "
                         f"{{label or group: [start, end]}}, got {table!r}")
    out = {}
    for key, pair in table.items():
        if key not in TABLE_KEYS:
            raise ValueError(f"{what}: unknown module {key!r}; expected labels or groups "
                             f"from: {', '.join(TABLE_KEYS)}")
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(positive_number(x) for x in pair)):
            raise ValueError(f"{what}: {key!r} must be [start, end], two positive finite "
                             f"numbers, got {pair!r}")
        out[key] = [float(pair[0]), float(pair[1])]
    fraction = values["final_fraction"]
    if not (positive_number(fraction) and fraction <= 1):
        raise ValueError(f"{what}: \"final_fraction\" must be a number in (0, 1], "
                         f"got {fraction!r}")
    return {"multipliers": out, "final_fraction": float(fraction)}


def load_multipliers_file(path: str, flag: str = "--multipliers"
                          ) -> tuple[dict[str, Any], dict[str, float]]:
    """Reads a ``--multipliers`` JSON file (what ``python -m train.search`` writes).

    Args:
      path: The file.
      flag: The command-line option that named it, for error messages.

    Returns:
      ``(table, settings)``: the table as :func:`check_multipliers` returns it, and the
      optional run settings of the file (``lr``, ``weight_decay``).

    Raises:
      ValueError: Unreadable file, not JSON, or bad content (one line naming the file).
    """
    what = f"{flag} {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} must hold a JSON object, got {type(values).__name__}")
    settings = {}
    for name in MULTIPLIERS_FILE_SETTINGS:
        if name in values:
            value = values.pop(name)
            ok = positive_number(value) or (name == "weight_decay" and value == 0)
            if not ok:
                raise ValueError(f"{what}: \"{name}\" must be a positive finite number, "
                                 f"got {value!r}")
            settings[name] = float(value)
    return check_multipliers(values, what), settings


def positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
