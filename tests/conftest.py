import pytest

pytest_plugins = ["tests.s3server"]

# Suites of features still being finished: their tests run with `-m wip` and stay
# out of the default run (and CI) until they are green on a clean machine. Remove a file from
# this set in the commit that makes it green.
# Today: the longest suite of the still-open issue 11 (read tasks on a 2-node cluster,
# ~100 s), out of CI only because its 30-minute budget has no room for it yet; it passes on
# the dev machine (`make test ARGS="-m wip"`).
WIP_FILES: set[str] = {
    "test_encode_scale.py",  # issue 11
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in WIP_FILES:
            item.add_marker(pytest.mark.wip)
