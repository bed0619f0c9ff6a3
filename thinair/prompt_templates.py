"""Prompt templating (seed 003, DiffuGen): expand templates x value lists x seeds into generation jobs.

Reads one template file (YAML ``.yaml``/``.yml`` or JSON ``.json``); writes nothing. The format::

    seed: 0                                     # optional int (default 0): seeds the seed draws below
    prompts:                                    # required, a non-empty list of entries
      - template: "a photo of a {object} at {time}"   # required; {name} placeholders only
        values:                                 # one non-empty list of distinct strings per placeholder
          object: [cat, dog]
          time: [dawn, noon, dusk]
        class: "{object}"                       # required: the label, a fixed name or placeholders of `values`
        seeds: [0, 1000]                        # required: the half-open seed range [start, stop), 0 <= start
        count: 2                                # required: seeds per prompt, 1 <= count <= stop - start

Every key of ``values`` must be a placeholder of ``template`` and every placeholder needs a ``values`` list; no
other keys are allowed. An entry expands to ``prod(len(v) for v in values) * count`` jobs: one prompt per
combination of values (the product, in the order placeholders first appear in the template), each with
``count`` distinct seeds drawn without replacement from the range by a generator seeded from
(file seed, entry index, prompt), listed in ascending order. So jobs do not depend on batching or on the other
entries, and the same file always gives the same jobs.
"""
from __future__ import annotations

import itertools
import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinair.io import seed_for

ENTRY_KEYS = {"template", "values", "class", "seeds", "count"}
TOP_KEYS = {"prompts", "seed"}


@dataclass(frozen=True)
class PromptJob:
    prompt: str
    class_name: str
    seed: int


@dataclass(frozen=True)
class TemplateEntry:
    template: str
    values: dict[str, tuple[str, ...]]  # placeholder -> values, in the template's placeholder order
    class_name: str
    seeds: tuple[int, int]  # [start, stop)
    count: int

    @property
    def size(self) -> int:
        return int(np.prod([len(v) for v in self.values.values()], dtype=np.int64)) * self.count


@dataclass(frozen=True)
class PromptSpec:
    entries: tuple[TemplateEntry, ...]
    seed: int = 0


def placeholders(text: str, where: str) -> list[str]:
    """Named ``{name}`` fields of `text` in order of first appearance; anything fancier is an error."""
    names = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise ValueError(f"{where}: {text!r} is not a valid template ({err}); write placeholders as {{name}} "
                         "and literal braces as {{ and }}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"{where}: placeholder {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                             f" in {text!r} must be a plain {{name}} (letters, digits, underscores)")
        if name not in names:
            names.append(name)
    return names


def _int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    return value


def parse_entry(raw, i: int) -> TemplateEntry:
    """Validate one raw entry (a dict from the file); errors name the entry and say how to fix it."""
    where = f"prompts[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping with keys {sorted(ENTRY_KEYS)}, got {type(raw).__name__}")
    if isinstance(raw.get("template"), str):
        where = f"prompts[{i}] ({raw['template']!r})"
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(ENTRY_KEYS)}")
    missing = sorted({"template", "class", "seeds", "count"} - set(raw))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; see the format in thinair/prompt_templates.py")
    if not isinstance(raw["template"], str) or not raw["template"].strip():
        raise ValueError(f"{where}: template must be a non-empty string")
    if not isinstance(raw["class"], str) or not raw["class"].strip():
        raise ValueError(f"{where}: class must be a non-empty string (a fixed name or e.g. '{{object}}')")
    names = placeholders(raw["template"], f"{where} template")
    values = raw.get("values") or {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: values must map each placeholder to a list, got {type(values).__name__}")
    for name in names:
        if name not in values:
            raise ValueError(f"{where}: placeholder {{{name}}} has no value list; add values.{name}: [...]")
    for name in values:
        if name not in names:
            raise ValueError(f"{where}: values.{name} is not used by the template; add {{{name}}} to the template "
                             f"or remove values.{name}")
    lists = {}
    for name in names:
        vals = values[name]
        if not isinstance(vals, list) or not vals:
            raise ValueError(f"{where}: values.{name} must be a non-empty list, got {vals!r}")
        if any(isinstance(v, (bool, dict, list)) or v is None for v in vals):
            raise ValueError(f"{where}: values.{name} must hold strings (or numbers), got {vals!r}")
        vals = tuple(str(v) for v in vals)
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise ValueError(f"{where}: values.{name} lists {dup} more than once; remove the duplicates")
        lists[name] = vals
    for name in placeholders(raw["class"], f"{where} class"):
        if name not in lists:
            raise ValueError(f"{where}: class {raw['class']!r} uses {{{name}}}, which is not a template placeholder; "
                             f"use one of {names} or a fixed class name")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or len(seeds) != 2:
        raise ValueError(f"{where}: seeds must be [start, stop) (two integers), got {seeds!r}")
    start, stop = _int(seeds[0], f"{where}: seeds[0]"), _int(seeds[1], f"{where}: seeds[1]")
    if not 0 <= start < stop:
        raise ValueError(f"{where}: seeds {seeds!r} must satisfy 0 <= start < stop")
    count = _int(raw["count"], f"{where}: count")
    if not 1 <= count <= stop - start:
        raise ValueError(f"{where}: count={count} but the seed range [{start}, {stop}) holds {stop - start} seeds; "
                         f"set 1 <= count <= {stop - start} or widen seeds")
    return TemplateEntry(raw["template"], lists, raw["class"], (start, stop), count)


def validate(raw, source: str = "<prompts>") -> PromptSpec:
    """Validate a parsed template document (dict) into a :class:`PromptSpec`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: the top level must be a mapping with a 'prompts' list, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {unknown}; allowed keys are {sorted(TOP_KEYS)}")
    entries = raw.get("prompts")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: 'prompts' must be a non-empty list of template entries")
    try:
        spec = PromptSpec(tuple(parse_entry(e, i) for i, e in enumerate(entries)),
                          _int(raw.get("seed", 0), "seed"))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return spec


def load_templates(path: str | Path) -> PromptSpec:
    """Read and validate a template file (``.json``, ``.yaml`` or ``.yml``)."""
    import yaml

    path = Path(path)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{path}: unsupported template file type {path.suffix!r}; use .json, .yaml or .yml")
    if not path.is_file():
        raise ValueError(f"{path}: no such template file")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()}: {str(err).splitlines()[0]}") from None
    return validate(raw, str(path))


def draw_seeds(entry: TemplateEntry, spec_seed: int, index: int, prompt: str) -> list[int]:
    """`entry.count` distinct seeds from [start, stop), deterministic in (spec seed, entry index, prompt)."""
    start, stop = entry.seeds
    rng = np.random.default_rng(seed_for(spec_seed, "prompts", index, prompt))
    return sorted(int(s) + start for s in rng.choice(stop - start, size=entry.count, replace=False))


def expand(spec: PromptSpec) -> list[PromptJob]:
    """Every (prompt, class, seed) job of the spec, entries in file order."""
    jobs = []
    for i, entry in enumerate(spec.entries):
        names = list(entry.values)
        for combo in itertools.product(*entry.values.values()):
            fill = dict(zip(names, combo))
            prompt, cls = entry.template.format(**fill), entry.class_name.format(**fill)
            jobs += [PromptJob(prompt, cls, s) for s in draw_seeds(entry, spec.seed, i, prompt)]
    return jobs


def class_names(jobs: list[PromptJob]) -> list[str]:
    """Sorted distinct class names: a job's label is its class name's position in this list."""
    return sorted({j.class_name for j in jobs})
