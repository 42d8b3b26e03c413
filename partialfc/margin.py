"""The combined margin ``s * (cos(m1 * theta + m2) - m3)`` applied to the target class.

Only the ``B`` target cosines of a batch go through the trigonometry here; the rest of the logit
matrix stays ``s * cos(theta)`` and never sees ``arccos``.

With ``phi = m1 * theta + m2`` and ``k = floor(phi / pi)`` the target function ``psi(theta)`` is:

- ``"monotonic"`` (default): ``psi = (-1)^k cos(phi) - 2k - m3``. Continuous, decreasing on
  ``[0, pi]`` for any margin, equal to ``cos(m1*theta + m2) - m3`` while ``phi <= pi`` and to
  SphereFace's psi when ``m2 = m3 = 0``.
- ``"linear"`` (``m1 = 1`` only; classic ArcFace, pytorch-metric-learning's ArcFaceLoss):
  ``psi = cos(theta + m2) - m3`` while ``theta <= pi - m2``, else ``cos(theta) - m2 sin(m2) - m3``.
- ``"none"``: ``psi = cos(phi) - m3``, no correction past ``phi = pi`` (what insightface's current
  ``CombinedMarginLoss`` computes; not monotonic for large angles).

Gradient: ``d psi / d cos = (d psi / d theta) / (-sin theta)``. It is exact except within
``theta < ~1e-3`` of the poles, where ``sin theta`` is clamped to ``_SIN_MIN`` so ``cos = +-1`` gives
finite values. ``straight_through=True`` replaces it by 1 (insightface's convention, which applies
the angular margin under ``no_grad``): the loss is the same, the target gradient is not exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Extension = Literal["monotonic", "linear", "none"]
_EXTENSIONS = ("monotonic", "linear", "none")
_SIN_MIN = 1e-3
KINDS = ("arcface", "cosface", "sphereface", "combined", "softmax")


@dataclass(frozen=True)
class CombinedMargin:
    """Margin parameters (radians for ``m2``), validated at construction. Immutable.

    ``CombinedMargin(s, m1=1, m2=0, m3=0)`` is plain (normalised) softmax with scale ``s``.
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    extension: Extension = "monotonic"
    straight_through: bool = False

    def __post_init__(self) -> None:
        for name in ("s", "m1", "m2", "m3"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CombinedMargin.{name} must be a finite number, got {value!r}")
        if self.s <= 0:
            raise ValueError(f"CombinedMargin.s (scale) must be > 0, got {self.s}")
        if self.m1 <= 0:
            raise ValueError(f"CombinedMargin.m1 (SphereFace multiplier) must be > 0, got {self.m1}")
        if not 0 <= self.m2 < math.pi:
            raise ValueError(f"CombinedMargin.m2 (ArcFace angle, radians) must be in [0, pi), got {self.m2}")
        if self.m3 < 0:
            raise ValueError(f"CombinedMargin.m3 (CosFace margin) must be >= 0, got {self.m3}")
        if self.extension not in _EXTENSIONS:
            raise ValueError(f"CombinedMargin.extension must be one of {_EXTENSIONS}, got {self.extension!r}")
        if self.extension == "linear" and self.m1 != 1:
            raise ValueError(f'extension="linear" is defined for m1 == 1 only, got m1={self.m1}')
        if not isinstance(self.straight_through, bool):
            raise ValueError(f"CombinedMargin.straight_through must be a bool, got {self.straight_through!r}")

    # presets -------------------------------------------------------------------------------
    @classmethod
    def arcface(cls, s: float = 64.0, m: float = 0.5, **kwargs) -> "CombinedMargin":
        """Additive angular margin: ``s * cos(theta + m)``."""
        return cls(s=s, m1=1.0, m2=m, m3=0.0, **kwargs)

    @classmethod
    def cosface(cls, s: float = 64.0, m: float = 0.4, **kwargs) -> "CombinedMargin":
        """Additive cosine margin: ``s * (cos(theta) - m)``."""
        return cls(s=s, m1=1.0, m2=0.0, m3=m, **kwargs)

    @classmethod
    def sphereface(cls, s: float = 30.0, m: float = 1.7, **kwargs) -> "CombinedMargin":
        """Multiplicative angular margin: ``s * psi(m * theta)`` (monotonic extension by default)."""
        return cls(s=s, m1=m, m2=0.0, m3=0.0, **kwargs)

    @classmethod
    def softmax(cls, s: float = 64.0) -> "CombinedMargin":
        """No margin: normalised softmax with scale ``s``."""
        return cls(s=s, m1=1.0, m2=0.0, m3=0.0)

    @classmethod
    def from_config(cls, config) -> "CombinedMargin":
        """The one factory from a config (an object or a mapping) with ``margin`` (a kind in
        ``KINDS``), ``s``, ``m1``, ``m2``, ``m3`` and optionally ``extension``, ``straight_through``.

        A named kind uses only its own parameter (``arcface``: m2, ``cosface``: m3, ``sphereface``:
        m1, ``softmax``: none); ``combined`` uses all three. Raises ``ValueError`` on bad values.
        """
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        kind = get("margin", "combined")
        extra = dict(extension=get("extension", "monotonic"), straight_through=get("straight_through", False))
        s, m1, m2, m3 = get("s", 64.0), get("m1", 1.0), get("m2", 0.0), get("m3", 0.0)
        params = {"softmax": (1.0, 0.0, 0.0), "arcface": (1.0, m2, 0.0), "cosface": (1.0, 0.0, m3),
                  "sphereface": (m1, 0.0, 0.0), "combined": (m1, m2, m3)}
        if kind not in params:
            raise ValueError(f"margin must be one of {KINDS}, got {kind!r}")
        m1, m2, m3 = params[kind]
        return cls(s=s, m1=m1, m2=m2, m3=m3, **extra)

    @classmethod
    def references(cls) -> dict[str, "CombinedMargin"]:
        """The usual margins at their presets' defaults, for figures: name -> margin."""
        arc, cos, sphere = cls.arcface(), cls.cosface(), cls.sphereface()
        return {"softmax": cls.softmax(), f"ArcFace m={arc.m2:g}": arc, f"CosFace m={cos.m3:g}": cos,
                f"SphereFace m={sphere.m1:g}": sphere}

    # math ----------------------------------------------------------------------------------
    @property
    def is_additive_cosine(self) -> bool:
        """True when ``psi = cos - m3`` (no angle needed: plain softmax or CosFace)."""
        return self.m1 == 1.0 and self.m2 == 0.0

    def psi_and_grad(self, cos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(psi, d psi / d cos)`` for target cosines ``cos_t`` (any shape), in at least float32.

        ``d psi / d cos`` is 1 everywhere when ``straight_through`` is set.
        """
        dtype = torch.promote_types(cos_t.dtype, torch.float32)
        c = cos_t.to(dtype).clamp(-1.0, 1.0)
        if self.is_additive_cosine:
            return c - self.m3, torch.ones_like(c)
        theta = torch.acos(c)
        phi = self.m1 * theta + self.m2
        sin_theta = torch.sqrt((1.0 - c * c).clamp_min(_SIN_MIN * _SIN_MIN))
        if self.extension == "linear":
            inside = theta <= math.pi - self.m2
            psi = torch.where(inside, torch.cos(phi), c - self.m2 * math.sin(self.m2)) - self.m3
            dpsi = torch.where(inside, torch.sin(phi) / sin_theta, torch.ones_like(c))
        elif self.extension == "monotonic":
            k = torch.floor(phi / math.pi)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
            psi = sign * torch.cos(phi) - 2.0 * k - self.m3
            dpsi = sign * self.m1 * torch.sin(phi) / sin_theta
        else:  # "none"
            psi = torch.cos(phi) - self.m3
            dpsi = self.m1 * torch.sin(phi) / sin_theta
        if self.straight_through:
            dpsi = torch.ones_like(c)
        return psi, dpsi

    def psi(self, cos_t: torch.Tensor) -> torch.Tensor:
        """``psi(theta)`` for target cosines (the target logit divided by ``s``)."""
        return self.psi_and_grad(cos_t)[0]

    def target_logit(self, theta: torch.Tensor) -> torch.Tensor:
        """``s * psi(theta)`` as a function of the angle (for plots and docs)."""
        return self.s * self.psi(torch.cos(theta))
