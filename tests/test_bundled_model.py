"""The embedded default model in assets/: it loads with no downloads and draws emoji-like images."""
import numpy as np
import pytest

from hart import HARTPipeline
from hart.pipeline import BUNDLED_MODEL


@pytest.fixture(scope="module")
def pipe():
    assert (BUNDLED_MODEL / "model_index.json").is_file(), f"the bundled model is missing: {BUNDLED_MODEL}"
    return HARTPipeline.from_pretrained(BUNDLED_MODEL)


def test_bundled_model_size_limit():
    total = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file())
    assert total <= 60 * 2 ** 20


def test_bundled_model_has_two_resolutions(pipe):
    assert pipe.resolutions == [64, 128]
    assert pipe.transformer.config.resolution_sides == (8, 16)


@pytest.mark.parametrize("resolution", [64, 128])
def test_bundled_model_generates_emoji_like_images(pipe, resolution):
    result = pipe(["red apple", "grinning face"], seed=0, resolution=resolution)
    for image in result.images:
        assert image.size == (resolution, resolution)
        pixels = np.asarray(image).astype(np.float32) / 255
        border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3)])
        # emoji sit centred on white: a light border and a coloured, non-flat middle
        assert border.mean() > 0.8
        middle = pixels[16:-16, 16:-16]
        assert middle.std() > 0.1
    assert result.images[0].tobytes() != result.images[1].tobytes()
    assert result.images[0].tobytes() != result.discrete_images[0].tobytes()
