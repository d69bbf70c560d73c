"""Near-duplicate search: multi-index hashing finds exactly the brute-force pairs; groups are transitive and
independent of row order; the hash is the audit's."""

import io

import numpy as np
import pytest
from PIL import Image

from radscribe.data.similar import NEAR_THRESHOLD, image_hash, near_pairs, similar_groups
from radscribe.errors import RadscribeError


def _clustered_hashes(seed: int = 0) -> np.ndarray:
    """Random 64-bit centres, each with a few copies at 0-7 flipped bits, plus exact repeats."""
    rng = np.random.default_rng(seed)
    rows = []
    for centre in rng.integers(0, 2 ** 63, size=150, dtype=np.uint64) * np.uint64(2):
        for _ in range(int(rng.integers(1, 6))):
            mask = 0
            for bit in rng.choice(64, size=int(rng.integers(0, 8)), replace=False):
                mask |= 1 << int(bit)
            rows.append(int(centre) ^ mask)
    hashes = np.array(rows, dtype=np.uint64)
    return np.concatenate([hashes, hashes[:10]])


@pytest.mark.parametrize("threshold", [0, 1, 4, 7, 12])
def test_near_pairs_are_exactly_the_brute_force_pairs(threshold):
    hashes = _clustered_hashes()
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    want_i, want_j = np.nonzero(np.triu(distance <= threshold, 1))
    i, j, d = near_pairs(hashes, threshold)
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(want_i.tolist(), want_j.tolist()))
    assert len(i) > 0 and (i < j).all() and (d == distance[i, j]).all()
    # Sorted by (j, distance, i): the first pair of each j is its nearest earlier neighbour.
    assert list(zip(j, d, i)) == sorted(zip(j, d, i))


def test_near_pairs_edge_cases():
    empty = near_pairs(np.zeros(0, np.uint64), 4)
    assert all(len(a) == 0 for a in empty)
    assert [a.tolist() for a in near_pairs([2 ** 64 - 1, 2 ** 64 - 2, 0], 1)] == [[0], [1], [1]]
    with pytest.raises(RadscribeError, match="0 to 63"):
        near_pairs([1, 2], 64)


def test_groups_are_transitive_and_independent_of_order():
    a, b, c, far = 0, 0b1111, 0b11111111, 2 ** 64 - 1  # a~b (4 bits), b~c (4 bits), a and c 8 bits apart
    keys = similar_groups(np.array([c, far, a, b], np.uint64), 4)
    assert keys.tolist() == [a, far, a, a]  # one group named by its smallest hash, and `far` alone
    hashes = _clustered_hashes(1)
    keys = similar_groups(hashes, NEAR_THRESHOLD)
    order = np.random.default_rng(2).permutation(len(hashes))
    assert (similar_groups(hashes[order], NEAR_THRESHOLD) == keys[order]).all()
    # Every near pair shares a group, and the groups are the connected components (no more, no fewer).
    i, j, _ = near_pairs(hashes, NEAR_THRESHOLD)
    assert (keys[i] == keys[j]).all()
    from scipy.sparse.csgraph import connected_components

    count, _ = connected_components(np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= NEAR_THRESHOLD)
    assert len(set(keys.tolist())) == count < len(set(hashes.tolist()))


def test_image_hash_sees_reencodes_and_names_undecodable_images():
    pixels = (np.random.default_rng(0).random((48, 48)) * 255).astype("uint8")
    smooth = np.kron(pixels[::8, ::8], np.ones((32, 32), "uint8"))  # 192 px: reduced before hashing
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(smooth).save(png, "PNG")
    Image.fromarray(smooth).save(jpeg, "JPEG", quality=60)
    other = io.BytesIO()
    Image.fromarray(255 - smooth).save(other, "PNG")
    h_png, h_jpeg, h_other = (image_hash(buf.getvalue(), "x") for buf in (png, jpeg, other))
    assert int(np.bitwise_count(np.uint64(h_png ^ h_jpeg))) <= NEAR_THRESHOLD
    assert int(np.bitwise_count(np.uint64(h_png ^ h_other))) > 16
    with pytest.raises(RadscribeError, match="broken.jpg"):
        image_hash(jpeg.getvalue()[:200] + b"\xff\xd9", "broken.jpg")
