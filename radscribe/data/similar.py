"""Near-duplicate images: a 64-bit perceptual hash, the pairs within a Hamming distance, and groups of them.

Used by `radscribe prepare --group-by similar` (near-duplicates stay on one side of the split) and by
`radscribe audit` (near-duplicates across the split are leaks): both hash with `image_hash` and pair with
`near_pairs`, so a dataset grouped at threshold k has no near pair within k bits across its splits.
"""

from __future__ import annotations

import numpy as np

from radscribe.errors import RadscribeError

NEAR_THRESHOLD = 4
"""Default largest pHash Hamming distance (of 64 bits) counted as a near duplicate (`audit --near-threshold`,
`prepare --near-threshold`). Re-encodes and adjacent slices of one volume fall within it; unrelated images lie
around 32 bits apart."""
HASH_SIDE = 128
"""Images are box-reduced by an integer factor to a short side of at least this many pixels before pHash's own
32x32 resize: pHash keeps only the lowest 8x8 frequencies, and its LANCZOS resize from 512 px cost more than the
JPEG decode."""


def image_hash(data: bytes, name: str) -> int:
    """The 64-bit pHash (imagehash) of an encoded image, decoded by the one image loader; `name` labels errors."""
    import imagehash

    from radscribe.data.imaging import load_image

    image = load_image(data, name=name).convert("L")
    factor = min(image.size) // HASH_SIDE
    if factor > 1:
        image = image.reduce(factor)
    bits = imagehash.phash(image).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def check_threshold(threshold: int, flag: str = "--near-threshold") -> None:
    if not isinstance(threshold, int) or not 0 <= threshold < 64:
        raise RadscribeError(f"{flag} must be a whole number of bits from 0 to 63, got {threshold!r}")


def near_pairs(hashes, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every index pair (i < j) of `hashes` within `threshold` bits, and its distance; sorted by (j, distance, i).

    Multi-index hashing (Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index hashing", CVPR
    2012): the 64 bits are cut into threshold + 1 blocks. Two hashes within `threshold` bits differ in at most
    `threshold` blocks, so they agree exactly on at least one (pigeonhole), and only hashes that share a block value
    are compared. Per block the hashes are sorted by that block; comparing each position with the one k places
    further on, for k = 1, 2, ... while any pair still shares the block, visits exactly the pairs in one bucket, in
    O(rows) vectorised steps per k. The work is the sum of squared bucket sizes, not n^2 (a 13-bit block spreads
    16k random hashes over 8,192 buckets); clusters of near-identical images make their buckets large.
    """
    check_threshold(threshold)
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    edges = np.linspace(0, 64, threshold + 2).round().astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        block = (hashes >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(block, kind="stable")
        sorted_hashes, sorted_block = hashes[order], block[order]
        step = 1
        active = np.flatnonzero(sorted_block[:-1] == sorted_block[1:])
        while active.size:
            near = active[np.bitwise_count(sorted_hashes[active] ^ sorted_hashes[active + step]) <= threshold]
            a, b = order[near], order[near + step]
            found_i.append(np.minimum(a, b))
            found_j.append(np.maximum(a, b))
            step += 1
            # A bucket is a contiguous run of equal block values, so the pairs `step` apart that still share it
            # are a subset of those `step - 1` apart that did.
            active = active[active + step < n]
            active = active[sorted_block[active] == sorted_block[active + step]]
    # A pair that agrees on several blocks is found once per block.
    pair = np.unique(np.concatenate(found_j) * max(n, 1) + np.concatenate(found_i))
    i, j = pair % max(n, 1), pair // max(n, 1)
    distance = np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int64)
    order = np.lexsort((i, distance, j))
    return i[order], j[order], distance[order]


def similar_groups(hashes, threshold: int) -> np.ndarray:
    """A group key per hash: the connected components of "within `threshold` bits", each named by its smallest
    hash. The key depends on the hashes alone (not on row order or ids), and equal hashes always share a group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    hashes = np.asarray(hashes, dtype=np.uint64)
    values, inverse = np.unique(hashes, return_inverse=True)  # sorted: a component's first value is its smallest
    i, j, _ = near_pairs(values, threshold)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(values), len(values)))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # labels are 0..components-1
    return values[first][labels[inverse.ravel()]]
