"""Shared paths for tests: the real collections live beside the checkout, never inside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def dataset(name: str) -> str:
    path = DATASETS / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the shared test collections must sit at "
                                f"{DATASETS}")
    return str(path)
