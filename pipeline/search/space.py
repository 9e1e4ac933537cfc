"""Search spaces of tune specs: dotted config keys -> distributions, checked against the
pipeline config before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, merge, nested, validate_config
from progan.config import StrictModel

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DISTRIBUTION_HELP = (
    "choice: [...], grid: [...], uniform: [a, b], loguniform: [a, b], randint: [a, b]"
)


@dataclass
class Dimension:
    """One search-space entry."""

    key: str
    kind: str
    args: list[Any]

    def candidates(self) -> list[Any]:
        """Values that must validate: every listed value, or both bounds and an inner point
        (a non-round one, so that a float range over an integer key is caught)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        a, b = self.args
        if self.kind == "randint":
            return [a, b]
        if self.kind == "loguniform":
            return [a, b, math.exp(math.log(a) + (math.log(b) - math.log(a)) * 0.377)]
        return [a, b, a + (b - a) * 0.377]

    def to_tune(self, algorithm: str):
        from ray import tune

        if self.kind == "grid" or (self.kind == "choice" and algorithm == "grid"):
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(self.args[0], self.args[1] + 1)  # ours is inclusive

    def pbt_mutation(self):
        """What PBT explores: a list for listed values (PBT moves to a neighbour; it would
        scale a `tune.choice` like a number), the range's distribution otherwise."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        return self.to_tune("random")

    def clamp(self, value: Any) -> Any:
        """A perturbed value (x 0.8 or x 1.2) brought back into the range it was drawn from;
        listed values are returned as they are."""
        if self.kind in ("choice", "grid"):
            return value
        low, high = self.args
        value = min(max(value, low), high)
        return round(value) if self.kind == "randint" else value

    def describe(self) -> str:
        return f"{self.kind} {self.args}"


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys; a leaf is a mapping whose single key is a distribution."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        is_section = (
            isinstance(value, dict)
            and value
            and not set(map(str, value)) & set(DISTRIBUTIONS)
            and all(isinstance(v, dict) for v in value.values())
        )
        if is_section:
            out.update(flatten_space(value, f"{name}."))
        else:
            out[name] = value
    return out


def check_config_key(key: str) -> None:
    """Raise unless `key` names a value in PipelineConfig (a dict field may take one subkey)."""
    model: type[StrictModel] = PipelineConfig
    parts = key.split(".")
    where = "the top level"
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            raise ConfigError(
                f"search_space.{key}: unknown config key '{part}' in {where}; "
                f"allowed there: {', '.join(sorted(fields))}"
            )
        annotation = fields[part].annotation
        rest = parts[i + 1 :]
        if isinstance(annotation, type) and issubclass(annotation, StrictModel):
            if not rest:
                raise ConfigError(
                    f"search_space.{key}: is a section, not a value; name one of its keys: "
                    f"{', '.join(sorted(annotation.model_fields))}"
                )
            model, where = annotation, f"'{'.'.join(parts[: i + 1])}'"
            continue
        is_dict = getattr(annotation, "__origin__", None) is dict or annotation is dict
        if rest and not (is_dict and len(rest) == 1):
            raise ConfigError(
                f"search_space.{key}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        return


def parse_dimension(key: str, spec: Any) -> Dimension:
    """Check one distribution's shape and arguments."""
    bad = f"search_space.{key}: {spec!r} is not a distribution; use one of {DISTRIBUTION_HELP}"
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ConfigError(bad)
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search_space.{key}: {kind} needs a non-empty list of values")
        return Dimension(key, kind, args)
    numbers = isinstance(args, list) and len(args) == 2
    numbers = numbers and all(isinstance(x, int | float) and not isinstance(x, bool) for x in args)
    if not numbers or not args[0] < args[1] + (kind == "randint"):
        raise ConfigError(f"search_space.{key}: {kind} needs [low, high] with low < high")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"search_space.{key}: loguniform needs 0 < low < high")
    if kind == "randint" and not all(isinstance(x, int) for x in args):
        raise ConfigError(f"search_space.{key}: randint needs integer bounds (inclusive)")
    return Dimension(key, kind, [float(x) if kind != "randint" else x for x in args])


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def validate_value(dim: Dimension, value: Any, raws: dict[str, dict[str, Any]]) -> None:
    """The value must validate in a trial and in the full-size best.yaml."""
    for what, raw in raws.items():
        try:
            validate_config(merge(raw, nested(dim.key, value)))
        except ConfigError as err:
            ranged = dim.kind in ("uniform", "loguniform")
            hint = " (use randint for integer keys)" if ranged else ""
            raise ConfigError(
                f"search_space.{dim.key}: value {value!r} fails validation in the {what} "
                f"config: {one_line(err)}{hint}"
            ) from None
