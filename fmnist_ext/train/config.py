"""A run's settings as one typed, frozen record: RunConfig.

The settings come from the recipe and the command line's overrides
(`RunConfig.from_args`), or, on --resume, from the checkpoint
(`RunConfig.from_checkpoint`). The checkpoint and summary.json hold
`to_dict()`, plain values, so a checkpoint loads with weights_only=True.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import recipes


@dataclass(frozen=True)
class RunConfig:
    # The field order is the order of the saved dict (and of the keys in summary.json).
    recipe: str
    seed: int  # the random seed (weights, shuffling, augmentation)
    kernels: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    weight_decay: float
    schedule: str
    label_smoothing: float
    crop_pad: int
    flip: bool
    shuffle: bool
    clean_epochs: int  # the last N epochs train on the plain images
    ema: float  # weight EMA decay; 0 = off

    @classmethod
    def from_args(cls, args) -> RunConfig:
        """The recipe (default: baseline), then every option the command line set."""
        recipe = args.recipe or recipes.DEFAULT_RECIPE
        settings = {
            "recipe": recipe,
            "seed": 0 if args.seed is None else args.seed,
            "kernels": args.kernels or "fused",
            **recipes.RECIPES[recipe],
        }
        for key in recipes.TRAINING_KEYS:
            value = getattr(args, key)
            if value is not None:
                settings[key] = value
        return cls(**settings)

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunConfig:
        """The settings a checkpoint recorded (already checked by recipes.config_problems);
        keys this version does not know are ignored."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def trains_like(self, other: RunConfig) -> bool:
        """Whether the two settings train the same run (seeds compared as torch uses them)."""
        return self.normalized() == other.normalized()

    def normalized(self) -> RunConfig:
        return dataclasses.replace(self, seed=recipes.torch_seed(self.seed))

    @property
    def augmented_epochs(self) -> int:
        """Epochs that see crops and flips (the rest train on the plain images)."""
        return self.epochs - self.clean_epochs


# The settings a command line can give (what --resume compares with the checkpoint's).
SETTINGS = tuple(f.name for f in dataclasses.fields(RunConfig))
