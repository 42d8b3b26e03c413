"""One factory from a config to any margin of the head (the trainer, config validation and tests use it)."""
from __future__ import annotations

from .adaface import AdaFace
from .curricularface import CurricularFace
from .margin import KINDS, CombinedMargin

MARGINS = KINDS + ("adaface", "curricularface")


def margin_from_config(config):
    """A margin from ``config`` (an object or a mapping) with ``margin`` in ``MARGINS``.

    Combined-margin kinds read ``s, m1, m2, m3, extension, straight_through``
    (:meth:`CombinedMargin.from_config`); ``adaface`` reads ``s``, ``m`` (default 0.4), ``h``,
    ``t_alpha``; ``curricularface`` reads ``s``, ``m`` (default 0.5), ``t_alpha``. Raises ``ValueError``.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    kind = get("margin", "combined")
    if kind == "adaface":
        m = get("m")
        return AdaFace(s=get("s", 64.0), m=0.4 if m is None else m, h=get("h", 0.333),
                       t_alpha=get("t_alpha", 0.01))
    if kind == "curricularface":
        m = get("m")
        return CurricularFace(s=get("s", 64.0), m=0.5 if m is None else m, t_alpha=get("t_alpha", 0.01))
    if kind not in KINDS:
        raise ValueError(f"margin must be one of {MARGINS}, got {kind!r}")
    return CombinedMargin.from_config(config)
