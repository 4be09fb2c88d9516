"""Tests for branching.config: loading, defaults, tree order, round trips and errors."""

import json
from pathlib import Path

import pytest

from branching.config.parse import config_from_dict, load_config, parse_config
from branching.config.tree import DEFAULT_CONFIG, Acceptance, NodeSpec, dump_toml
from branching.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

ORIGINAL = """
[parent]
classes = ["sunflower", "poppy", "tulip", "crab", "aquarium_fish", "shark"]
hidden = [1024, 512]          # input 3072 and output len(classes) are implied

[branches.fish]
classes = ["crab", "aquarium_fish", "shark"]
layer = 1                     # 0-based hidden layer of the parent that the branch reads
hidden = [256]

[branches.flower]
classes = ["sunflower", "poppy", "tulip"]
layer = 1
hidden = [256]
"""

PARENT = '[parent]\nclasses = ["a", "b", "c", "d"]\n'


def branch(name="x", body='classes = ["a", "b"]'):
    return f"\n[branches.{name}]\n{body}\n"


def test_original_parses_to_expected_specs():
    cfg = parse_config(ORIGINAL)
    assert cfg.parent == NodeSpec(
        name="parent", classes=("sunflower", "poppy", "tulip", "crab", "aquarium_fish", "shark"),
        hidden=(1024, 512), source=None, layer=None, where=None, activation="relu", dropout=None,
        accept=Acceptance())
    assert list(cfg.branches) == ["fish", "flower"]
    assert cfg.branches["fish"] == NodeSpec(
        name="fish", classes=("crab", "aquarium_fish", "shark"), hidden=(256,), source="parent",
        layer=1, where=None, activation="relu", dropout=None, accept=Acceptance())
    assert cfg.branches["flower"].classes == ("sunflower", "poppy", "tulip")
    assert cfg.branches["fish"].class_index("shark") == 2
    assert cfg.path is None


def test_shipped_original_matches_and_is_default():
    assert DEFAULT_CONFIG == CONFIGS / "original.toml"
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.path == str(DEFAULT_CONFIG)
    assert cfg.parent == parse_config(ORIGINAL).parent
    assert cfg.branches == parse_config(ORIGINAL).branches


@pytest.mark.parametrize("name, branches", [
    ("original.toml", ["fish", "flower"]),
    ("cifar100-6.toml", ["mammals", "plants"]),
    ("cifar100-6-deep.toml", ["animals", "water", "plants"]),
])
def test_shipped_configs_load(name, branches):
    cfg = load_config(CONFIGS / name)
    assert list(cfg.branches) == branches
    assert len(cfg.parent.classes) == 6


def test_defaults_applied():
    cfg = parse_config(PARENT + branch())
    p, b = cfg.parent, cfg.branches["x"]
    assert (p.hidden, p.activation, p.dropout, p.accept) == ((1024, 512), "relu", None, Acceptance())
    assert (b.source, b.layer, b.hidden, b.where, b.activation, b.dropout) == (
        "parent", 1, (256,), None, "relu", None)
    risk = parse_config(PARENT + '[parent.accept]\nrule = "risk"\nrisk = 0.1\n').parent.accept
    assert risk == Acceptance(rule="risk", risk=0.1, delta=0.05)


def test_no_branches_is_valid():
    cfg = parse_config(PARENT)
    assert cfg.branches == {} and [n.name for n in cfg.nodes()] == ["parent"]


def test_full_options_and_linear_branch():
    text = (PARENT + 'hidden = [8, 4, 2]\nactivation = "gelu"\ndropout = 0\n'
            '[parent.accept]\nrule = "coverage"\ncoverage = 1\ncalibrate = true\n'
            + branch(body='classes = ["a", "b"]\nlayer = -3\nhidden = []\nwhere = "pre"\n'
                          'dropout = 0.5\n[branches.x.accept]\nthreshold = 1.0\ntemperature = 2'))
    cfg = parse_config(text)
    assert cfg.parent.dropout == 0.0 and cfg.parent.accept.coverage == 1.0
    assert cfg.parent.accept.calibrate is True
    x = cfg.branches["x"]
    assert (x.layer, x.hidden, x.where) == (0, (), "pre")
    assert x.accept == Acceptance(threshold=1.0, temperature=2.0)


@pytest.mark.parametrize("layer, expected", [(-1, 1), (-2, 0), (0, 0), (1, 1)])
def test_negative_layer_normalised(layer, expected):
    cfg = parse_config('[parent]\nclasses = ["a", "b"]\nhidden = [4, 3]\n'
                       + branch(body=f'classes = ["a", "b"]\nlayer = {layer}'))
    assert cfg.branches["x"].layer == expected


def check_deep(cfg):
    assert [n.name for n in cfg.nodes()] == ["parent", "animals", "water", "plants"]
    assert cfg.chain("water") == ["parent", "animals", "water"]
    assert cfg.chain("parent") == ["parent"]
    assert [cfg.depth(n) for n in ("parent", "animals", "water", "plants")] == [0, 1, 2, 1]
    assert [n.name for n in cfg.children("parent")] == ["animals", "plants"]
    assert [n.name for n in cfg.children("animals")] == ["water"]
    assert cfg.children("water") == []


def test_deep_tree_order_chain_depth():
    cfg = load_config(CONFIGS / "cifar100-6-deep.toml")
    check_deep(cfg)
    assert cfg.node("water").source == "animals" and cfg.node("water").layer == 0


def test_sub_branch_listed_before_its_source():
    text = (CONFIGS / "cifar100-6-deep.toml").read_text()
    head, water_and_plants = text.split("[branches.water]")
    animals_start = head.index("[branches.animals]")
    water, plants = water_and_plants.split("[branches.plants]")
    reordered = (head[:animals_start] + "[branches.water]" + water + head[animals_start:]
                 + "[branches.plants]" + plants)
    cfg = parse_config(reordered)
    assert list(cfg.branches) == ["water", "animals", "plants"]
    check_deep(cfg)
    assert parse_config(dump_toml(cfg)) == cfg


def test_unknown_node():
    cfg = parse_config(ORIGINAL)
    assert cfg.node("parent") is cfg.parent
    with pytest.raises(ConfigError, match="'nope'"):
        cfg.node("nope")
    with pytest.raises(ConfigError, match="'nope'"):
        cfg.branches["fish"].class_index("nope")


@pytest.mark.parametrize("name", ["original.toml", "cifar100-6.toml", "cifar100-6-deep.toml"])
def test_to_dict_round_trip(name):
    cfg = load_config(CONFIGS / name)
    d = json.loads(json.dumps(cfg.to_dict()))
    back = config_from_dict(d)
    assert back == cfg and list(back.branches) == list(cfg.branches)


def test_round_trips_with_every_option(tmp_path):
    text = (PARENT + 'activation = "tanh"\ndropout = 0.25\n'
            '[parent.accept]\nrule = "risk"\nrisk = 0.1\ndelta = 0.01\ncalibrate = false\n'
            + branch("y-1", 'classes = ["a", "b", "c"]\nwhere = "post"\n'
                            '[branches.y-1.accept]\nrule = "coverage"\ncoverage = 0.8\n'
                            'temperature = 1.5')
            + branch("z", 'classes = ["b", "c"]\nfrom = "y-1"\nhidden = []\nlayer = 0'))
    cfg = parse_config(text)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert parse_config(dump_toml(cfg)) == cfg
    file = tmp_path / "dumped.toml"
    file.write_text(dump_toml(cfg))
    loaded = load_config(file)
    assert loaded.path == str(file) and loaded.branches == cfg.branches


def test_dump_escapes_strings():
    cfg = parse_config('[parent]\nclasses = ["qu\\"ote", "back\\\\slash", "tab\\there", "é"]\n')
    assert parse_config(dump_toml(cfg)) == cfg


def bad(text):
    return PARENT + text


ERRORS = [
    # (toml text, substrings the message must contain)
    ('colour = 1\n' + PARENT, ["'colour'", "top level", "allowed: data, parent, branches"]),
    ("", ["[parent]"]),
    (PARENT + "hiden = [1]\n", ["'hiden'", "[parent]", "allowed:"]),
    (bad(branch("fish", 'classes = ["a", "b"]\nhiden = [1]')),
     ["unknown key 'hiden' in [branches.fish] (did you mean 'hidden'?); allowed: classes, new_classes, from, layer, hidden, where, pool, "
      "activation, dropout, accept"]),
    (bad("[parent.accept]\nrul = 1\n"), ["'rul'", "[parent.accept]"]),
    ("[parent]\nhidden = [4]\n", ["classes", "required"]),
    ('[parent]\nclasses = ["a"]\n', ["classes", "at least 2"]),
    ('[parent]\nclasses = ["a", "a", "b"]\n', ["classes", "'a'", "more than once"]),
    ('[parent]\nclasses = ["a", ""]\n', ["classes", "empty"]),
    ('[parent]\nclasses = "ab"\n', ["classes", "list of strings"]),
    ('[parent]\nclasses = ["a", 1]\n', ["classes", "list of strings"]),
    (bad("hidden = []\n"), ["[parent] hidden", "at least one"]),
    (bad("hidden = [0]\n"), ["[parent] hidden", ">= 1"]),
    (bad('hidden = "512"\n'), ["[parent] hidden"]),
    (bad("hidden = [true]\n"), ["[parent] hidden"]),
    (bad("hidden = [1.5]\n"), ["[parent] hidden"]),
    (bad('activation = "swish"\n'), ["activation", "'swish'", "relu"]),
    (bad("dropout = 1.0\n"), ["dropout", "[0, 1)"]),
    (bad("dropout = -0.1\n"), ["dropout"]),
    (bad('dropout = "0.1"\n'), ["dropout"]),
    (bad("dropout = true\n"), ["dropout"]),
    (bad("dropout = nan\n"), ["dropout"]),
    ("branches = 3\n" + PARENT, ["branches", "table"]),
    (bad("[branches]\nfish = 1\n"), ["[branches.fish]", "table"]),
    (bad(branch('"bad name"')), ["'bad name'", "branch name"]),
    (bad(branch("parent")), ["'parent'", "branch name"]),
    (bad(branch(body='classes = ["a", "b"]\nfrom = "ghost"')), ["[branches.x] from", "'ghost'"]),
    (bad(branch(body='classes = ["a", "b"]\nfrom = 1')), ["[branches.x] from"]),
    (bad(branch("a", 'classes = ["a", "b"]\nfrom = "b"') + branch("b", 'classes = ["a", "b"]\nfrom = "a"')),
     ["cycle", "a -> b -> a"]),
    (bad(branch("me", 'classes = ["a", "b"]\nfrom = "me"')), ["cycle", "me -> me"]),
    (bad(branch(body='classes = ["a", "zz", "yy"]')), ["[branches.x] classes", "'zz', 'yy'", "'parent'"]),
    (bad(branch("s", 'classes = ["a", "b"]') + branch("t", 'classes = ["a", "c"]\nfrom = "s"')),
     ["[branches.t] classes", "'c'", "source 's'"]),
    (bad(branch(body='classes = ["a", "b"]\nlayer = 2')), ["[branches.x] layer", "2", "out of range"]),
    (bad(branch(body='classes = ["a", "b"]\nlayer = -3')), ["[branches.x] layer", "-3"]),
    (bad(branch(body='classes = ["a", "b"]\nlayer = true')), ["[branches.x] layer", "integer"]),
    (bad(branch(body='classes = ["a", "b"]\nlayer = 1.0')), ["[branches.x] layer", "integer"]),
    (bad(branch(body='classes = ["a", "b"]\nlayer = "1"')), ["[branches.x] layer"]),
    (bad(branch("lin", 'classes = ["a", "b"]\nhidden = []') + branch("y", 'classes = ["a", "b"]\nfrom = "lin"')),
     ["[branches.y] layer", "'lin'", "0 hidden"]),
    (bad(branch(body='classes = ["a", "b"]\nwhere = "mid"')), ["[branches.x] where", "pre, post"]),
    (bad(branch(body='classes = ["a", "b"]\nhidden = [-1]')), ["[branches.x] hidden"]),
    (bad('[parent.accept]\nrule = "vote"\n'), ["[parent.accept] rule", "threshold, coverage, risk"]),
    (bad('[parent.accept]\nrule = "coverage"\nthreshold = 0.5\ncoverage = 0.9\n'),
     ["threshold", "rule 'coverage'", 'rule = "threshold"']),
    (bad("[parent.accept]\ncoverage = 0.9\n"), ["coverage", "rule 'threshold'"]),
    (bad("[parent.accept]\ndelta = 0.1\n"), ["delta", "rule 'threshold'"]),
    (bad('[parent.accept]\nrule = "coverage"\n'), ["[parent.accept] coverage", "required"]),
    (bad('[parent.accept]\nrule = "risk"\n'), ["[parent.accept] risk", "required"]),
    (bad('[parent.accept]\nrule = "risk"\nrisk = 1\n'), ["risk", "(0, 1)"]),
    (bad("[parent.accept]\nthreshold = 0\n"), ["threshold", "(0, 1]"]),
    (bad("[parent.accept]\nthreshold = 1.5\n"), ["threshold", "(0, 1]"]),
    (bad("[parent.accept]\nthreshold = true\n"), ["threshold"]),
    (bad('[parent.accept]\nrule = "coverage"\ncoverage = 0\n'), ["coverage", "(0, 1]"]),
    (bad('[parent.accept]\nrule = "risk"\nrisk = 0.1\ndelta = 1\n'), ["delta", "(0, 1)"]),
    (bad("[parent.accept]\ntemperature = -1.0\n"), ["temperature"]),
    (bad("[parent.accept]\ntemperature = 0\n"), ["temperature"]),
    (bad("[parent.accept]\ntemperature = inf\n"), ["temperature"]),
    (bad('[parent.accept]\ncalibrate = "yes"\n'), ["calibrate", "true or false"]),
    (bad(branch(body='classes = ["a", "b"]\n[branches.x.accept]\nthreshold = 2')),
     ["[branches.x.accept] threshold"]),
    (bad("accept = 3\n"), ["[parent.accept]", "table"]),
    (PARENT + '[branches.x]\nclasses = ["a", "b"]\n[branches.y]\nclasses = ["b", "c"]\n',
     ["[branches.x] and [branches.y]", "share 'b'", "siblings must not share classes"]),
    (PARENT + "classes = [\n", ["invalid TOML"]),
]


@pytest.mark.parametrize("text, expected", ERRORS)
def test_errors_name_the_problem(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, origin="configs/x.toml")
    message = str(info.value)
    assert message.startswith("configs/x.toml: ") and "\n" not in message
    for part in expected:
        assert part in message


def test_threshold_one_accepted():
    accept = parse_config(bad("[parent.accept]\nthreshold = 1.0\n")).parent.accept
    assert accept.threshold == 1.0


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_invalid_toml_file_named(tmp_path):
    file = tmp_path / "broken.toml"
    file.write_text('[parent]\nclasses = ["a", "b"] oops\n')
    with pytest.raises(ConfigError) as info:
        load_config(file)
    message = str(info.value)
    assert message.startswith(f"{file}: invalid TOML") and "line" in message and "\n" not in message


def test_from_dict_validates():
    d = parse_config(ORIGINAL).to_dict()
    d["branches"]["fish"]["layer"] = 5
    with pytest.raises(ConfigError, match=r"\[branches.fish\] layer"):
        config_from_dict(d)
