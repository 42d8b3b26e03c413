"""Session-wide test settings, applied before any test module is imported.

Triton's CPU interpreter: ``triton.jit`` and triton's settings read ``TRITON_INTERPRET`` when triton
is first imported, and ``import partialfc`` already imports it (through ``torch._dynamo``) when it
is installed. So the variable must be set before the first test module is collected, not in
``tests/test_triton.py``; nothing else in the suite runs Triton kernels (inductor compiles C++ on
the CPU). Spawned ranks inherit it.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
