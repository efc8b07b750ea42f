"""What a store records about its model, and the errors of loading one: no torch needed.

Kept apart from the embedder so that reading a store (and answering a text query through an
exported text encoder) never imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class WeightsUnavailableError(RuntimeError):
    """The requested weights can't be had (offline, not cached, unknown tag, missing file)."""


class ModelConfigError(ValueError):
    """The model name or config file is not usable."""


@dataclass(frozen=True)
class ModelSpec:
    """What a store records about the model so that queries are embedded the same way."""

    model: str  # open_clip architecture name (a config file registers under its stem)
    pretrained: str  # tag, absolute checkpoint path, or "none"
    weights_id: str  # the tag, or "sha256:<hex>" of a checkpoint file
    embed_dim: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] | None = None  # the JSON of a config file, kept in the store

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def same_model(self, other: ModelSpec) -> bool:
        return (self.model, self.weights_id, self.embed_dim) == (
            other.model,
            other.weights_id,
            other.embed_dim,
        )
