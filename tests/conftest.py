import pytest

pytest_plugins = ["tests.s3server"]

# Suites of features still being finished: their tests run with `-m wip` and stay
# out of the default run (and CI) until they are green on a clean machine. Remove a file from
# this set in the commit that makes it green.
# Today: the two longest suites of the still-open issues 11 (scale: read tasks on a 2-node
# cluster, ~100 s) and 14 (Matryoshka vectors through encode, index and Serve, ~45-90 s),
# out of CI only because its 30-minute budget has no room for them yet; they pass on the dev
# machine (`make test ARGS="-m wip"`).
WIP_FILES: set[str] = {
    "test_encode_scale.py",  # issue 11
    "test_matryoshka_serving.py",  # issue 14 (marks itself too)
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in WIP_FILES:
            item.add_marker(pytest.mark.wip)
