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

Every expanded prompt keeps its attribute values and its seeds. Everything is checked when the set
is built (before any model is loaded): lists must be lists, counts non-negative integers, keys known,
and every labelled word must appear as whole words in each of its prompts (``"two {object}s"``
gives "two cars", where the word "car" cannot be found, so it is refused).
"""

from __future__ import annotations

import itertools
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

SET_KEYS = ("templates", "seeds_per_prompt", "first_seed")
TEMPLATE_KEYS = ("template", "attributes", "mode", "samples", "seed", "words")
# words as CLIP's tokenizer splits them: contractions, letter runs, single digits, punctuation runs
_WORD_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+", re.IGNORECASE)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to generate: its text, attribute values, seeds, and the words to label."""

    prompt: str
    attributes: dict[str, str]
    seeds: tuple[int, ...]
    words: tuple[str, ...] = ()


def prompt_words(text: str) -> list[str]:
    """``text`` split into words the way CLIP's tokenizer splits them (lower case)."""
    return _WORD_PATTERN.findall(text.lower())


def contains_words(prompt: str, phrase: str) -> bool:
    """Whether ``phrase`` ("traffic light") appears as consecutive whole words of ``prompt``."""
    wanted, words = prompt_words(phrase), prompt_words(prompt)
    return bool(wanted) and any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}")
    return value


def _check_string_list(value, name: str, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings, not {value!r}; write [{value!r}] for a single value"
                         if isinstance(value, str) else f"{name} must be a list of strings, not {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} is empty; give it at least one value")
    bad = [item for item in value if not isinstance(item, str) or not item.strip()]
    if bad:
        raise ValueError(f"{name} must hold non-empty strings; {bad!r} are not")
    duplicated = sorted({item for item in value if list(value).count(item) > 1})
    if duplicated:
        raise ValueError(f"{name} lists {duplicated} more than once; give each value once")
    return list(value)


def _check_keys(entry: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; allowed: {list(allowed)} (a typo?)")


@dataclass
class PromptTemplate:
    template: str
    attributes: dict[str, list[str]]
    mode: str = "product"
    samples: int | None = None
    seed: int = 0
    words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError(f"template must be a non-empty string, not {self.template!r}")
        try:
            keys = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as error:
            raise ValueError(f"template {self.template!r} is not a valid format string ({error}); "
                             "write attributes as {name} and literal braces as {{ }}") from None
        if "" in keys or any(not name.isidentifier() for name in keys):
            raise ValueError(f"template {self.template!r} has an empty or invalid field; name every field, e.g. {{object}}")
        if not isinstance(self.attributes, dict):
            raise ValueError(f"attributes of {self.template!r} must be a mapping name -> list of values, not {self.attributes!r}")
        self.attributes = {name: _check_string_list(values, f"attribute {name!r} of {self.template!r}")
                           for name, values in self.attributes.items()}
        self.words = _check_string_list(self.words, f"words of {self.template!r}", allow_empty=True)
        missing, unused = keys - set(self.attributes), set(self.attributes) - keys
        if missing:
            raise ValueError(f"template {self.template!r} uses {sorted(missing)} but attributes define only {sorted(self.attributes)}")
        if unused:
            raise ValueError(f"attributes {sorted(unused)} do not appear in template {self.template!r}")
        if self.mode not in ("product", "sample"):
            raise ValueError(f"mode must be 'product' or 'sample', not {self.mode!r}")
        if self.mode == "sample":
            if self.samples is None:
                raise ValueError("mode 'sample' needs samples: N (how many prompts to draw)")
            _check_count(self.samples, f"samples of {self.template!r}", 1)
        elif self.samples is not None:
            raise ValueError(f"samples: {self.samples} is only used with mode: sample; remove it or set mode: sample")
        _check_count(self.seed, f"seed of {self.template!r}", 0)
        unknown_words = set(self.words) - set(self.attributes)
        if unknown_words:
            raise ValueError(f"words {sorted(unknown_words)} are not attributes of {self.template!r}")
        self._check_words_in_prompts()

    def _check_words_in_prompts(self) -> None:
        """Every labelled value must be findable as whole words in the prompt it fills."""
        for name in self.words:
            for value in self.attributes[name]:
                filled = {key: values[0] for key, values in self.attributes.items()}
                prompt = self.template.format(**{**filled, name: value})
                if not contains_words(prompt, value):
                    raise ValueError(
                        f"the labelled word {value!r} ({name}) is not a whole word of its prompt {prompt!r}, so it "
                        f"cannot get a heatmap; write the template so that {{{name}}} stands alone "
                        f"(e.g. 'a {{{name}}}' rather than 'two {{{name}}}s'), or drop {name!r} from words")

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

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("a prompt set needs at least one template")
        _check_count(self.seeds_per_prompt, "seeds_per_prompt", 1)
        _check_count(self.first_seed, "first_seed", 0)

    @classmethod
    def load(cls, path: str | Path) -> "PromptSet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt-set file at {path}; pass a YAML or JSON file (see daamlab.prompts)")
        text = path.read_text()
        try:
            config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: dict, source: str = "the prompt set") -> "PromptSet":
        if not isinstance(config, dict):
            raise ValueError(f"{source} must be a mapping with a 'templates' list, not {type(config).__name__}")
        _check_keys(config, SET_KEYS, source)
        entries = config.get("templates")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{source} needs a non-empty 'templates' list, not {entries!r}")
        templates = []
        for number, entry in enumerate(entries):
            where = f"template {number} of {source}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be a mapping with template and attributes, not {entry!r}")
            _check_keys(entry, TEMPLATE_KEYS, where)
            if "template" not in entry or "attributes" not in entry:
                raise ValueError(f"{where} needs both 'template' and 'attributes'")
            templates.append(PromptTemplate(**entry))
        return cls(templates, config.get("seeds_per_prompt", 1), config.get("first_seed", 0))

    def to_dict(self) -> dict:
        """The set as plain data (what ``from_dict`` reads): used to fingerprint a dataset."""
        return {"seeds_per_prompt": self.seeds_per_prompt, "first_seed": self.first_seed,
                "templates": [{"template": t.template, "attributes": t.attributes, "mode": t.mode, "samples": t.samples,
                               "seed": t.seed, "words": list(t.words)} for t in self.templates]}

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
