"""Test ordering for ``./run_all.sh --tests``, which runs the suite on two pytest-xdist workers, one file per worker
at a time (``--dist loadfile --no-loadscope-reorder``): the end-to-end smoke run is by far the longest file, so it
is collected first and its worker starts on it while the other worker takes every other file."""

FIRST = "test_smoke.py"


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name != FIRST)  # stable: every other file keeps its order
