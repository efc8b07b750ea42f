"""Test vectors for the ANN benchmarks: a Gaussian mixture shaped like CLIP embeddings.

The vectors are not uniform noise, on which every ANN index looks bad (no neighbourhoods) and
the nearest neighbours are all about as far: they come from a Gaussian mixture shaped like
CLIP image embeddings. Components (2048 by default) sit around a few dozen groups, so
neighbouring clusters overlap; their sizes are log-normal and their spreads vary 2.7x; the
noise has a 1/i eigenvalue spectrum in a random basis (intrinsic dimension ~30, like CLIP's);
a shared mean direction gives the typical positive cosine between unrelated images. At 100k
x 512: random pairs have cosine ~0.42, a query's nearest neighbour ~0.84, its 10th ~0.82.
Queries are fresh draws from the same mixture, never members of the collection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

CHUNK = 50_000  # vectors drawn (and added) at a time: ~100 MB of temporaries at d = 512


@dataclass
class Mixture:
    """x = normalise(mean + (centre_j + spread_j * z) @ basis), z ~ N(0, diag(spectrum))."""

    std: np.ndarray  # (D,) per-axis noise std in the latent basis, total variance 1
    basis: np.ndarray  # (D, D) random rotation: the spectrum isn't axis-aligned
    mean: np.ndarray  # (D,) shared direction of all embeddings
    centres: np.ndarray  # (C, D) component centres, latent coordinates
    spread: np.ndarray  # (C,) noise scale of each component
    weights: np.ndarray  # (C,) component probabilities

    @classmethod
    def make(
        cls, dim: int, components: int = 2048, groups: int = 64, seed: int = 0
    ) -> Mixture:
        rng = np.random.default_rng(seed)
        spectrum = 1.0 / np.arange(1, dim + 1)  # participation ratio ~ 30 dims at d = 512
        std = np.sqrt(spectrum / spectrum.sum()).astype(np.float32)
        basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        mean = rng.standard_normal(dim).astype(np.float32)
        mean *= 1.3 / np.linalg.norm(mean)  # 1.3: random pairs end up at cosine ~0.4
        # Components gather around groups, so that some clusters overlap their neighbours and
        # a query near a cluster's edge needs several IVF lists (as with real photos).
        group_centres = rng.standard_normal((groups, dim)).astype(np.float32) * std
        centres = group_centres[rng.integers(0, groups, components)]
        centres += 0.6 * rng.standard_normal((components, dim)).astype(np.float32) * std
        spread = np.exp(rng.uniform(math.log(0.6), math.log(1.6), components)).astype(np.float32)
        weights = rng.lognormal(0.0, 1.0, components)
        return cls(std, basis, mean, centres, spread, weights / weights.sum())

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, D) float32 unit vectors."""
        which = rng.choice(len(self.weights), n, p=self.weights)
        latent = rng.standard_normal((n, len(self.std)), dtype=np.float32)
        latent *= self.std
        latent *= self.spread[which, None]
        latent += self.centres[which]
        x = latent @ self.basis
        x += self.mean
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def exact_collection(
    mixture: Mixture, n: int, seed: int, chunk: int = CHUNK
) -> tuple[faiss.Index, faiss.IndexFlatIP, np.ndarray]:
    """(exact index as vqret builds it, its flat storage, a (n, D) view of the vectors).

    The vectors are drawn chunk by chunk straight into the exact index; the view reads the
    index's own storage, so the collection exists once in memory however many indexes use it.
    """
    flat = faiss.IndexFlatIP(len(mixture.std))
    exact = faiss.IndexIDMap2(flat)  # vqret's exact index: IDMap2 over a flat inner product
    rng = np.random.default_rng([seed, n])
    for start in range(0, n, chunk):
        part = mixture.draw(min(chunk, n - start), rng)
        exact.add_with_ids(part, np.arange(start, start + len(part), dtype=np.int64))
    view = faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d)
    return exact, flat, view
