"""Images built once per test session (the debootstrap result is shared by every flavour)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloudbuild.images.build import ImageSpec, build_image

BUILD_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the debootstrap tarball goes: CLOUDBUILD_IMAGE_CACHE to keep it across sessions."""
    kept = os.environ.get("CLOUDBUILD_IMAGE_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("image-cache")


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory, image_cache: Path) -> Callable[[str, str], Path]:
    images: dict[tuple[str, str], Path] = {}

    def get(kind: str, cloud: str) -> Path:
        if (kind, cloud) not in images:
            out = tmp_path_factory.mktemp(f"{kind}-{cloud}") / f"{kind}-{cloud}.raw"
            started = time.monotonic()
            images[kind, cloud] = build_image(ImageSpec(kind, cloud), out, cache=image_cache)
            BUILD_SECONDS[f"{kind}-{cloud}"] = time.monotonic() - started
            print(f"\nimage {kind}-{cloud}: built in {BUILD_SECONDS[f'{kind}-{cloud}']:.0f}s")
        return images[kind, cloud]

    return get
