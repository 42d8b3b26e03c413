"""Compatibility shim: the run's data moved to :mod:`launch.data.run_data`
(also exported by :mod:`launch.data`). Import from there in new code."""
from launch.data.run_data import HeldOut, RunData, build_run_data, synthetic_glyphs

__all__ = ["HeldOut", "RunData", "build_run_data", "synthetic_glyphs"]
