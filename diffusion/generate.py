"""Text (or a CLIP embedding) -> images: retrieval prior, DiT sampling, tokenizer decoding.

    import vqret
    images = vqret.generate("a red car", store="photos/", n=4, seed=0)
    images.save("out.png")                 # out.png, out-1.png, ...
    images.scores                          # CLIP cosine of each image to the prompt
    images.codes                           # (4, G, G) uint16: the tokenizer's codes of each

The DiT was trained on CLIP *image* embeddings. A text embedding lies elsewhere in CLIP space
(the modality gap), so the text is first mapped towards the image embeddings by a retrieval
prior, a cheap stand-in for unCLIP's learned prior: the softmax-weighted mean (temperature
PRIOR_TEMPERATURE over cosine scores) of the top `prior_k` image embeddings of the collection
for the text, blended with the text embedding itself,

    c = normalise(prior_blend * text + (1 - prior_blend) * weighted_mean(top-k images)).

prior_blend 1 conditions on the text alone; 0 on the retrieved images alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from vqret.retrieval.atomic import atomic_write
from vqret.retrieval.collection import Collection
from vqret.retrieval.device import resolve_device
from vqret.tokenizer.api import Tokenizer
from vqret.tokenizer.store_codes import store_tokenizer_path

from .checkpoint import CheckpointInfo, load_checkpoint
from .flow import SOLVERS, sample
from .model import DiT
from .paths import diffusion_path

__all__ = ["GeneratedImages", "Generator", "generate", "output_paths"]

PRIOR_K = 8
PRIOR_BLEND = 0.5
PRIOR_TEMPERATURE = 0.05


@dataclass
class GeneratedImages:
    images: np.ndarray  # uint8 (N, S, S, 3)
    codes: np.ndarray  # uint16 (N, G, G): the tokenizer's code grid of each image
    scores: np.ndarray  # float32 (N,): CLIP cosine to the prompt (or to the given embedding)
    conditioning: np.ndarray  # float32 (E,): the embedding the model was conditioned on
    seeds: list[int]  # image i starts from the noise of seeds[i]
    prompt: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # steps, guidance, prior, ...

    def __len__(self) -> int:
        return len(self.images)

    def to_pil(self) -> list[Image.Image]:
        return [Image.fromarray(a, "RGB") for a in self.images]

    def save(self, path: str | os.PathLike[str]) -> list[Path]:
        """Write PNGs: `path`, then path-1.png, path-2.png, ...; returns the paths."""
        paths = output_paths(path, len(self))
        for image, p in zip(self.to_pil(), paths, strict=True):
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, lambda tmp, image=image: image.save(tmp, format="PNG"))
        return paths

    def to_dicts(self, paths: list[Path] | None = None) -> list[dict[str, Any]]:
        return [
            {"path": str(paths[i]) if paths else None, "seed": self.seeds[i],
             "clip_score": round(float(self.scores[i]), 6), "prompt": self.prompt,
             "codes_shape": list(self.codes.shape[1:]),
             "codes": self.codes[i].reshape(-1).tolist(),  # row-major, as the store keeps them
             **self.settings}
            for i in range(len(self))
        ]


def output_paths(path: str | os.PathLike[str], n: int) -> list[Path]:
    """out.png -> [out.png, out-1.png, ...]."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the output must be a .png file")
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n)]


class Generator:
    """A trained DiT with the collection (CLIP space, prior) and tokenizer it belongs to."""

    def __init__(self, collection: Collection, model: DiT, info: CheckpointInfo,
                 tokenizer: Tokenizer, device: torch.device) -> None:
        self.collection = collection
        self.model = model
        self.info = info
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def load(
        cls,
        collection: Collection | str | os.PathLike[str] | None = None,
        *,
        model: str | os.PathLike[str] | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
        device: str = "auto",
    ) -> Generator:
        """The store's model (default STORE/diffusion) and tokenizer, checked against each
        other and against the collection's CLIP model."""
        if not isinstance(collection, Collection):
            collection = Collection.open(collection, device=device)
        store = collection.store
        dev = resolve_device(device)
        dit, info = load_checkpoint(diffusion_path(store, model), dev)
        spec = store.spec
        if info.clip.get("weights_id") != spec.weights_id or info.config.cond_dim != store.dim:
            raise ValueError(
                f"the diffusion model was trained on embeddings of {info.clip.get('model')} "
                f"({info.clip.get('weights_id')}), but {store.path} uses {spec.model} "
                f"({spec.weights_id}): train one for this store with `vqret diffusion train`"
            )
        tok_path = store_tokenizer_path(store, tokenizer, info.tokenizer_path)
        tok = Tokenizer.load(tok_path, device=str(dev))
        if tok.id != info.tokenizer_id:
            raise ValueError(
                f"{tok_path}: tokenizer {tok.id[:12]} is not the {info.tokenizer_id[:12]} the "
                "diffusion model was trained with; pass --tokenizer with that one"
            )
        return cls(collection, dit, info, tok, dev)

    # ---- conditioning -------------------------------------------------------------------
    def prior(self, text_embedding: np.ndarray, k: int = PRIOR_K,
              blend: float = PRIOR_BLEND) -> np.ndarray:
        """The retrieval prior (module docstring): a text embedding -> (E,) unit vector."""
        if k < 1:
            raise ValueError(f"prior_k must be >= 1, got {k}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"prior_blend must be in [0, 1], got {blend}")
        text = np.asarray(text_embedding, np.float32).reshape(-1)
        if blend == 1.0:
            return text / np.linalg.norm(text)
        hits = self.collection.search(embedding=text, k=k)
        rows = self.collection.store.rows_by_id([h.id for h in hits], ["id", "embedding"])
        kept = [h for h in hits if h.id in rows]
        vectors = np.array([rows[h.id]["embedding"] for h in kept], np.float32)
        scores = np.array([h.score for h in kept], np.float32)
        weights = np.exp((scores - scores.max()) / PRIOR_TEMPERATURE)
        mean = (weights[:, None] * vectors).sum(0) / weights.sum()
        mixed = blend * text + (1 - blend) * mean / np.linalg.norm(mean)
        return mixed / np.linalg.norm(mixed)

    # ---- sampling -----------------------------------------------------------------------
    def generate(
        self,
        text: str | None = None,
        *,
        embedding: np.ndarray | None = None,
        n: int = 4,
        steps: int = 50,
        guidance: float = 3.0,
        seed: int = 0,
        prior_k: int = PRIOR_K,
        prior_blend: float = PRIOR_BLEND,
        solver: str = "euler",
    ) -> GeneratedImages:
        """n images for a text (through the retrieval prior) or a CLIP embedding (as is).

        Image i starts from the noise of seed + i, so image i is the same whatever n is.
        """
        if (text is None) == (embedding is None):
            raise ValueError("give exactly one of a text or an embedding")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        if steps < 1 or solver not in SOLVERS:
            raise ValueError(f"steps must be >= 1 and solver one of {SOLVERS}, got {steps}, "
                             f"{solver!r}")
        if text is not None:
            target = self.collection.query_embedding(text=text)
            cond = self.prior(target, prior_k, prior_blend)
        else:
            target = np.asarray(embedding, np.float32).reshape(-1)
            if target.shape[0] != self.info.config.cond_dim:
                raise ValueError(f"embedding has dimension {target.shape[0]}, the model takes "
                                 f"{self.info.config.cond_dim}")
            target = target / np.linalg.norm(target)
            cond = target
        c = self.info.config
        seeds = [seed + i for i in range(n)]
        noise = torch.stack([
            torch.randn((c.latent_channels, c.latent_size, c.latent_size),
                        generator=torch.Generator().manual_seed(s))
            for s in seeds
        ])
        emb = torch.from_numpy(np.repeat(cond[None], n, axis=0))
        latents = sample(self.model, emb, steps=steps, guidance=guidance, solver=solver,
                         noise=noise)
        images, codes = self.tokenizer.decode_latents(
            (latents / self.info.latent_scale).float().cpu().numpy()
        )
        pil = [Image.fromarray(a, "RGB") for a in images]
        scores = self.collection.embedder.embed_images(pil) @ target
        settings = {"steps": steps, "guidance": guidance, "solver": solver}
        if text is not None:
            settings.update(prior_k=prior_k, prior_blend=prior_blend)
        return GeneratedImages(images, codes, scores.astype(np.float32), cond, seeds, text,
                               settings)


def generate(
    text: str | None = None,
    *,
    embedding: np.ndarray | None = None,
    store: str | os.PathLike[str] | Collection | None = None,
    model: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str = "auto",
    **options: Any,
) -> GeneratedImages:
    """Images for a text or a CLIP embedding from `store`'s diffusion model (see
    Generator.generate for n, steps, guidance, seed, prior_k, prior_blend, solver)."""
    generator = Generator.load(store, model=model, tokenizer=tokenizer, device=device)
    return generator.generate(text, embedding=embedding, **options)
