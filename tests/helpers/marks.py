"""Marks shared by the tests."""

import pytest

#: For engine tests that rewire without an optimizer on purpose (masks, random streams,
#: removal rules): the engine's warning that optimizer state is then not masked is expected.
#: ``tests/sparse/test_engine.py::test_rewiring_without_the_optimizers_warns_once`` checks it.
REWIRES_WITHOUT_OPTIMIZER = pytest.mark.filterwarnings(
    "ignore:SparseEngine.rewire ran without optimizers:UserWarning")
