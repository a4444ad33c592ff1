"""Where a model is split: the exits on the edge and the layer whose output the cloud receives."""

from __future__ import annotations

from dataclasses import dataclass

from cecollm.errors import UserError


@dataclass(frozen=True)
class Split:
    """A validated split of a model with `n_layers` decoder layers."""

    n_layers: int  # decoder layers in the whole model
    exits: tuple[int, ...]  # exits, as numbers of decoder layers run; the edge runs up to the last
    upload_layer: int  # the cloud receives every position's hidden state after this many layers

    def __post_init__(self) -> None:
        if not self.exits:
            raise UserError("at least one exit is needed")
        for e in self.exits:
            if not 1 <= e < self.n_layers:
                raise UserError(f"exit {e} is out of range: the model has {self.n_layers} layers, exits must be 1..{self.n_layers - 1}")
        if any(b <= a for a, b in zip(self.exits, self.exits[1:])):
            raise UserError(f"exits must be strictly increasing, got {','.join(map(str, self.exits))}")
        if not 1 <= self.upload_layer <= self.last_exit:
            raise UserError(f"upload layer {self.upload_layer} must be in 1..{self.last_exit} (the last exit)")

    @property
    def last_exit(self) -> int:
        return self.exits[-1]

    @classmethod
    def create(cls, n_layers: int, exits, upload_layer: int | None = None) -> Split:
        exits = tuple(int(e) for e in exits)
        upload = exits[-1] if upload_layer is None and exits else upload_layer
        return cls(n_layers, exits, int(upload) if upload is not None else 0)

    def describe(self) -> str:
        return f"exits {','.join(map(str, self.exits))} of {self.n_layers} layers, upload after {self.upload_layer}"


def parse_exits(text: str) -> tuple[int, ...]:
    """'8,15' -> (8, 15); a UserError for anything else."""
    try:
        exits = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--exits takes layer counts separated by commas, like 8,15; got {text!r}") from None
    if not exits:
        raise UserError("--exits is empty")
    return exits


def default_exits(n_layers: int) -> tuple[int, ...]:
    """Exits for a model without measured defaults: a quarter and half of its depth."""
    quarter, half = max(1, n_layers // 4), max(1, n_layers // 2)
    return (quarter, half) if half > quarter else (quarter,)
