"""The plain-DDP example in examples/ trains: its loss falls, identically on every rank."""
import importlib.util
from pathlib import Path

from tests.dist_utils import run_distributed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_example.py"


def _run_example(rank, world):
    spec = importlib.util.spec_from_file_location("ddp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run()


def test_ddp_example_trains_on_two_ranks():
    a, b = run_distributed(_run_example, 2)
    assert a == b  # the loss is the global mean: the same number on both ranks
    assert sum(a[-5:]) / 5 < 0.5 * sum(a[:5]) / 5
