"""Prompt templating: documented expansion size, seeds in range and distinct, determinism, clear errors."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from thinair.prompt_templates import PromptJob, class_names, expand, load_templates, validate

SPEC = {
    "seed": 3,
    "prompts": [
        {"template": "a photo of a {object} at {time}", "values": {"object": ["cat", "dog"],
                                                                  "time": ["dawn", "noon", "dusk"]},
         "class": "{object}", "seeds": [100, 200], "count": 4},
        {"template": "a {view} view of a car", "values": {"view": ["side", "top"]}, "class": "car",
         "seeds": [0, 5], "count": 5},
        {"template": "an empty street", "class": "street", "seeds": [0, 10], "count": 2},
    ],
}


def _write(tmp_path, obj, suffix=".yaml"):
    path = tmp_path / f"templates{suffix}"
    path.write_text(yaml.safe_dump(obj) if suffix != ".json" else json.dumps(obj))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_expansion_size_is_the_documented_product(tmp_path, suffix):
    spec = load_templates(_write(tmp_path, SPEC, suffix))
    jobs = expand(spec)
    expected = sum(math.prod(len(v) for v in e.get("values", {}).values()) * e["count"] for e in SPEC["prompts"])
    assert len(jobs) == expected == 2 * 3 * 4 + 2 * 5 + 2
    assert [e.size for e in spec.entries] == [24, 10, 2]
    assert all(isinstance(j, PromptJob) for j in jobs)
    assert len(set(jobs)) == len(jobs)


def test_prompts_classes_and_seeds():
    jobs = expand(validate(SPEC))
    cat_dawn = [j for j in jobs if j.prompt == "a photo of a cat at dawn"]
    assert len(cat_dawn) == 4 and {j.class_name for j in cat_dawn} == {"cat"}
    assert len({j.seed for j in cat_dawn}) == 4 and all(100 <= j.seed < 200 for j in cat_dawn)
    assert sorted(j.seed for j in jobs if j.prompt == "a side view of a car") == [0, 1, 2, 3, 4]  # whole range
    assert all(0 <= j.seed < 10 for j in jobs if j.class_name == "street")
    assert class_names(jobs) == ["car", "cat", "dog", "street"]


def test_deterministic_and_seeded():
    a, b = expand(validate(SPEC)), expand(validate(json.loads(json.dumps(SPEC))))
    assert a == b
    other = expand(validate(SPEC | {"seed": 4}))
    assert [j.prompt for j in other] == [j.prompt for j in a] and [j.seed for j in other] != [j.seed for j in a]
    # an entry's seeds do not depend on the other entries
    alone = expand(validate({"seed": 3, "prompts": SPEC["prompts"][:1]}))
    assert alone == a[:24]


def _entry(**over):
    e = {"template": "a {object}", "values": {"object": ["cat"]}, "class": "{object}", "seeds": [0, 10], "count": 2}
    return {k: v for k, v in (e | over).items() if v is not None}


@pytest.mark.parametrize("entry, message", [
    (_entry(template="a {object} at {time}"), r"prompts\[1\] \('a \{object\} at \{time\}'\): placeholder \{time\} "
                                              r"has no value list; add values.time"),
    (_entry(values={"object": ["cat"], "sky": ["blue"]}), r"values.sky is not used by the template; add \{sky\}"),
    (_entry(colour="red"), r"unknown key\(s\) \['colour'\]"),
    (_entry(count=11), r"count=11 but the seed range \[0, 10\) holds 10 seeds"),
    (_entry(seeds=[5, 5]), r"0 <= start < stop"),
    (_entry(seeds=[0]), r"seeds must be \[start, stop\)"),
    (_entry(count=0), r"1 <= count <= 10"),
    (_entry(values={"object": []}), r"values.object must be a non-empty list"),
    (_entry(values={"object": ["cat", "cat"]}), r"lists \['cat'\] more than once"),
    (_entry(**{"class": "{animal}"}), r"uses \{animal\}, which is not a template placeholder"),
    (_entry(**{"class": None}), r"missing key\(s\) \['class'\]"),
    (_entry(template="a {object:>5}"), r"must be a plain \{name\}"),
    (_entry(template="a {0}"), r"must be a plain \{name\}"),
])
def test_bad_entries_name_the_entry_and_the_fix(entry, message):
    with pytest.raises(ValueError, match=message):
        validate({"prompts": [_entry(), entry]})
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        validate({"prompts": [_entry(), entry]})


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="no such template file"):
        load_templates(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unsupported template file type"):
        load_templates(_write(tmp_path, SPEC, ".txt"))
    bad = tmp_path / "bad.json"
    bad.write_text("{prompts: [")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_templates(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("prompts: [a, b\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_templates(bad_yaml)
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_templates(_write(tmp_path, ["a"]))
    with pytest.raises(ValueError, match=r"unknown top-level key\(s\) \['prompt'\]"):
        validate({"prompt": []})
    with pytest.raises(ValueError, match="'prompts' must be a non-empty list"):
        validate({"prompts": []})
    with pytest.raises(ValueError, match="seed must be an integer"):
        validate({"prompts": [_entry()], "seed": "x"})
