"""Templated prompt sets (DiffuGen): templates with replaceable attributes, expanded with seeds.

A prompt-set file (YAML or JSON)::

    seeds_per_prompt: 2
    first_seed: 0
    templates:
      - template: "a photo of a {object} in a city street, {weather}, {time}"
        attributes:
          object: [car, person, traffic light]
          weather: [sunny, rainy, foggy]
          time: [at noon, at night]
        mode: product            # every combination; or "sample" with `samples: N` and `seed`
        words: [object]          # attributes whose value gets a heatmap and a label

Every expanded prompt keeps its attribute values and its seeds.
"""

from __future__ import annotations

import itertools
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to generate: its text, attribute values, seeds, and the words to label."""

    prompt: str
    attributes: dict[str, str]
    seeds: tuple[int, ...]
    words: tuple[str, ...] = ()


@dataclass
class PromptTemplate:
    template: str
    attributes: dict[str, list[str]]
    mode: str = "product"
    samples: int | None = None
    seed: int = 0
    words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        keys = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        missing, unused = keys - set(self.attributes), set(self.attributes) - keys
        if missing:
            raise ValueError(f"template {self.template!r} uses {sorted(missing)} but attributes define only {sorted(self.attributes)}")
        if unused:
            raise ValueError(f"attributes {sorted(unused)} do not appear in template {self.template!r}")
        empty = [name for name, values in self.attributes.items() if not values]
        if empty:
            raise ValueError(f"attribute lists {empty} are empty; give each attribute at least one value")
        if self.mode not in ("product", "sample"):
            raise ValueError(f"mode must be 'product' or 'sample', not {self.mode!r}")
        if self.mode == "sample" and not self.samples:
            raise ValueError("mode 'sample' needs samples: N (how many prompts to draw)")
        unknown_words = set(self.words) - set(self.attributes)
        if unknown_words:
            raise ValueError(f"words {sorted(unknown_words)} are not attributes of {self.template!r}")

    def combinations(self) -> list[dict[str, str]]:
        names = list(self.attributes)
        if self.mode == "product":
            return [dict(zip(names, values)) for values in itertools.product(*(self.attributes[n] for n in names))]
        rng = np.random.default_rng(self.seed)
        return [{n: self.attributes[n][rng.integers(len(self.attributes[n]))] for n in names} for _ in range(self.samples)]


@dataclass
class PromptSet:
    templates: list[PromptTemplate]
    seeds_per_prompt: int = 1
    first_seed: int = 0

    @classmethod
    def load(cls, path: str | Path) -> "PromptSet":
        path = Path(path)
        text = path.read_text()
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: dict, source: str = "the prompt set") -> "PromptSet":
        if not isinstance(config, dict) or not config.get("templates"):
            raise ValueError(f"{source} needs a non-empty 'templates' list")
        allowed = {"template", "attributes", "mode", "samples", "seed", "words"}
        templates = []
        for entry in config["templates"]:
            unknown = set(entry) - allowed
            if unknown:
                raise ValueError(f"unknown template keys {sorted(unknown)} in {source}; allowed: {sorted(allowed)}")
            templates.append(PromptTemplate(**entry))
        if config.get("seeds_per_prompt", 1) < 1:
            raise ValueError("seeds_per_prompt must be at least 1")
        return cls(templates, config.get("seeds_per_prompt", 1), config.get("first_seed", 0))

    def expand(self) -> list[PromptSpec]:
        """Every prompt with its own seeds (consecutive, so each (prompt, seed) is unique)."""
        specs, next_seed = [], self.first_seed
        for template in self.templates:
            for values in template.combinations():
                seeds = tuple(range(next_seed, next_seed + self.seeds_per_prompt))
                next_seed += self.seeds_per_prompt
                words = tuple(values[name] for name in template.words)
                specs.append(PromptSpec(template.template.format(**values), values, seeds, words))
        return specs
