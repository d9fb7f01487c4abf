"""Tests for llama_vision.config: YAML + includes + CLI overrides -> typed dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from llama_vision.config import ConfigError, config_to_dict, load_config, parse_cli, save_config


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    image_size: int = 448
    max_images: Optional[int] = None


@dataclass
class TrainConfig:
    name: str = "run"
    max_steps: int = 100
    bf16: bool = True
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    output_dir: Path = Path("runs/default")
    tags: dict[str, int] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # A nested default that differs from the nested class's own defaults.
    eval_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0))


@dataclass
class Required:
    steps: int
    name: str = "x"


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_without_file():
    assert load_config(TrainConfig) == TrainConfig()


def test_yaml_nested_and_types(tmp_path):
    p = write(
        tmp_path / "c.yaml",
        """
name: exp1
max_steps: 500
bf16: false
optim:
  lr: 1.0e-4
  betas: [0.8, 0.99]
data:
  paths: [a.jsonl, b.jsonl]
  max_images: 4
tags: {x: 1}
""",
    )
    cfg = load_config(TrainConfig, p)
    assert cfg.name == "exp1" and cfg.max_steps == 500 and cfg.bf16 is False
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.1  # untouched key keeps its default
    assert cfg.optim.betas == (0.8, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"] and cfg.data.max_images == 4
    assert cfg.tags == {"x": 1}


def test_overrides_types_lists_null(tmp_path):
    p = write(tmp_path / "c.yaml", {"data": {"max_images": 4}})
    cfg = load_config(
        TrainConfig,
        p,
        [
            "optim.lr=3e-4",  # YAML 1.1 reads this as a string; the float field coerces it
            "max_steps=20",
            "bf16=false",
            "data.paths=[x.jsonl, y.jsonl]",
            "data.max_images=null",
            "name=007",  # str field keeps the text verbatim
            "output_dir=/tmp/out",
            "precision=fp32",
            "optim={weight_decay: 0.0}",  # a mapping override merges into the section
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.max_steps == 20 and cfg.bf16 is False
    assert cfg.data.paths == ["x.jsonl", "y.jsonl"] and cfg.data.max_images is None
    assert cfg.name == "007" and cfg.output_dir == Path("/tmp/out") and cfg.precision == "fp32"


def test_partial_nested_section_merges_onto_field_default():
    cfg = load_config(TrainConfig, None, ["eval_optim.weight_decay=0.5"])
    assert cfg.eval_optim.lr == 1.0 and cfg.eval_optim.weight_decay == 0.5


def test_int_coercions():
    assert load_config(TrainConfig, None, ["max_steps=1e3"]).max_steps == 1000
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(TrainConfig, None, ["max_steps=1.5"])


def test_unknown_key_suggestion(tmp_path):
    p = write(tmp_path / "c.yaml", {"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    msg = str(e.value)
    assert "optim.lrr" in msg and "did you mean 'optim.lr'" in msg and "optim.weight_decay" in msg
    with pytest.raises(ConfigError, match="max_step.*did you mean 'max_steps'"):
        load_config(TrainConfig, None, ["max_step=3"])


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("max_steps=abc", "max_steps", "int"),
        ("bf16=1", "bf16", "bool"),
        ("optim.lr=fast", "optim.lr", "float"),
        ("data.paths=notalist", "data.paths", "list"),
        ("data.max_images=many", "data.max_images", "int"),
        ("precision=fp16", "precision", "'bf16'"),
        ("optim.betas=[0.9]", "optim.betas", "2 items"),
        ("optim=3", "optim", "mapping"),
    ],
)
def test_type_errors_name_key_expected_and_value(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [override])
    msg = str(e.value)
    assert f"'{key}" in msg and expected in msg
    assert override.split("=", 1)[1].strip("[]") in msg


def test_yaml_str_field_rejects_number(tmp_path):
    p = write(tmp_path / "c.yaml", "name: 12\n")
    with pytest.raises(ConfigError, match=r"'name': expected str, got 12"):
        load_config(TrainConfig, p)


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required config key 'steps'"):
        load_config(Required, None)
    assert load_config(Required, None, ["steps=3"]).steps == 3
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(TrainConfig, missing)


def test_malformed_override_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, None, ["max_steps"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, None, ["optim..lr=1"])
    bad = write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainConfig, bad)
    top_list = write(tmp_path / "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainConfig, top_list)


def test_base_and_defaults_includes(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", {"name": "root", "max_steps": 1, "optim": {"lr": 0.5, "weight_decay": 0.2}})
    write(tmp_path / "sub" / "mid.yaml", {"base": "../root.yaml", "max_steps": 2, "optim": {"lr": 0.25}})
    write(tmp_path / "sub" / "extra.yaml", {"seed": 7, "data": {"paths": ["p"]}})
    child = write(
        tmp_path / "sub" / "child.yaml",
        {"defaults": ["mid.yaml", "extra.yaml"], "name": "child", "data": {"image_size": 224}},
    )
    cfg = load_config(TrainConfig, child, ["optim.weight_decay=0.0"])
    assert cfg.name == "child"  # own keys win over parents
    assert cfg.max_steps == 2  # nearer parent wins over grandparent
    assert cfg.optim.lr == 0.25 and cfg.optim.weight_decay == 0.0  # deep merge, then overrides
    assert cfg.seed == 7 and cfg.data.paths == ["p"] and cfg.data.image_size == 224


def test_include_errors(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(TrainConfig, tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"base": "missing.yaml"})
    with pytest.raises(ConfigError, match=r"missing\.yaml.*included from"):
        load_config(TrainConfig, tmp_path / "c.yaml")


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(TrainConfig, None, ["optim.lr=1e-5", "data.paths=[a]", "tags={k: 2}", "name=hi"])
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, out)
    assert load_config(TrainConfig, out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp files left
    d = config_to_dict(cfg)
    assert d["optim"]["betas"] == [0.9, 0.95] and d["output_dir"] == "runs/default"
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_config_to_dict_matches_fields():
    d = config_to_dict(TrainConfig())
    assert list(d) == [f.name for f in dataclasses.fields(TrainConfig)]


def test_parse_cli():
    path, overrides, flags = parse_cli(
        ["--config", "c.yaml", "optim.lr=1e-4", "--resume", "max_steps=5", "--dry-run", "--out=/x"]
    )
    assert path == "c.yaml"
    assert overrides == ["optim.lr=1e-4", "max_steps=5"]
    assert flags == {"resume": True, "dry_run": True, "out": "/x"}
    assert parse_cli(["--config=d.yaml"]) == ("d.yaml", [], {})
    assert parse_cli([]) == (None, [], {})
    with pytest.raises(ConfigError, match="stray"):
        parse_cli(["stray"])
    with pytest.raises(ConfigError, match="--config"):
        parse_cli(["--config"])


# --------------------------------------------------------------------------- documentation

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from llama_vision.config import ConfigKey, config_keys, field_docs, format_config_help, format_type, format_value  # noqa: E402
from llama_vision.training.train_config import TrainConfig as RealTrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DocLeaf:
    """A section two levels down."""

    depth: int = 3
    """How deep."""


@dataclass
class DocOptim:
    """The optimizer section."""

    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas,
    over two lines."""
    clip: Optional[float] = None
    leaf: DocLeaf = field(default_factory=DocLeaf)
    """A nested section."""


@dataclass
class DocRoot:
    steps: int
    """Required: no default."""
    name: str = "run"
    """The run's name."""
    mode: Literal["fp32", "bf16"] = "bf16"
    """Precision."""
    paths: list[str] = field(default_factory=lambda: ["a", "b"])
    """Input files."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Free-form tags."""
    out: Path = Path("runs/x")
    """Where to write."""
    undocumented: bool = True  # a comment is not a docstring
    optim: DocOptim = field(default_factory=DocOptim)
    """Optimizer settings."""
    eval_optim: DocOptim = field(default_factory=lambda: DocOptim(lr=1.0))
    """A section whose default differs from its class's."""


@dataclass
class DocChild(DocRoot):
    extra: int = 1
    """Added by a subclass."""


def test_config_keys_on_a_hand_written_tree():
    keys = list(config_keys(DocRoot))
    assert all(isinstance(k, ConfigKey) and not k.is_section for k in keys)
    table = {k.key: (k.type, k.default, k.doc, k.section) for k in keys}
    assert list(table) == [
        "steps", "name", "mode", "paths", "tags", "out", "undocumented",
        "optim.lr", "optim.betas", "optim.clip", "optim.leaf.depth",
        "eval_optim.lr", "eval_optim.betas", "eval_optim.clip", "eval_optim.leaf.depth",
    ]
    assert table["steps"] == ("int", dataclasses.MISSING, "Required: no default.", "")
    assert table["name"] == ("str", "run", "The run's name.", "")
    assert table["mode"] == ("Literal['fp32', 'bf16']", "bf16", "Precision.", "")
    assert table["paths"] == ("list[str]", ["a", "b"], "Input files.", "")  # default_factory called
    assert table["tags"] == ("dict[str, Any]", {}, "Free-form tags.", "")
    assert table["out"] == ("Path", Path("runs/x"), "Where to write.", "")
    assert table["undocumented"] == ("bool", True, "", "")
    assert table["optim.lr"] == ("float", 3e-4, "Peak learning rate.", "optim")
    assert table["optim.betas"] == ("tuple[float, float]", (0.9, 0.95), "Adam betas,\nover two lines.", "optim")
    assert table["optim.clip"] == ("Optional[float]", None, "", "optim")
    assert table["optim.leaf.depth"] == ("int", 3, "How deep.", "optim.leaf")
    # A section's keys default to the section field's default instance, as load_config merges.
    assert table["eval_optim.lr"][1] == 1.0 and load_config(DocRoot, None, ["steps=1"]).eval_optim.lr == 1.0
    assert keys[0].required and not keys[1].required

    with_sections = [(k.key, k.is_section, k.doc) for k in config_keys(DocRoot, sections=True) if k.is_section]
    assert with_sections == [
        ("optim", True, "Optimizer settings."),
        ("optim.leaf", True, "A nested section."),
        ("eval_optim", True, "A section whose default differs from its class's."),
        ("eval_optim.leaf", True, "A nested section."),
    ]
    # Inherited fields keep their docstrings; the subclass's own come last, as dataclasses order them.
    child = {k.key: k.doc for k in config_keys(DocChild)}
    assert child["name"] == "The run's name." and list(child)[-1] == "extra" and child["extra"] == "Added by a subclass."
    assert field_docs(DocOptim) == {"lr": "Peak learning rate.", "betas": "Adam betas,\nover two lines.", "leaf": "A nested section."}
    with pytest.raises(TypeError):
        list(config_keys(DocRoot()))


def test_config_keys_on_a_class_defined_in_a_function():
    # Under `from __future__ import annotations` a local section's name cannot be resolved;
    # the walker still finds the section from its default and reads the docstrings.
    @dataclass
    class Inner:
        k: int = 2
        """Inner key."""

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        """Inner section."""
        x: Optional[int] = None
        """An optional."""

    got = [(k.key, k.type, k.default, k.doc) for k in config_keys(Outer)]
    assert got == [("inner.k", "int", 2, "Inner key."), ("x", "Optional[int]", None, "An optional.")]


def test_format_type_and_value():
    assert format_type(int) == "int" and format_type(Optional[int]) == "Optional[int]"
    assert format_type(int | None) == "Optional[int]" and format_type(int | str) == "int | str"
    assert format_type(list[str]) == "list[str]" and format_type(tuple[int, ...]) == "tuple[int, ...]"
    assert format_type(dict[str, Any]) == "dict[str, Any]" and format_type(Path) == "Path"
    assert format_type(Literal["a", 1]) == "Literal['a', 1]"
    assert [format_value(v) for v in (None, True, 3, 1e-4, "", "x y", [], (0.9, 0.95), {}, Path("a/b"))] == [
        "null", "true", "3", "0.0001", "''", "x y", "[]", "[0.9, 0.95]", "{}", "a/b",
    ]
    assert format_value(dataclasses.MISSING) == "(required)"
    # What --help shows is what an override takes back.
    for k in config_keys(RealTrainConfig):
        assert load_config(RealTrainConfig, None, [f"{k.key}={k.default_text}"]) == RealTrainConfig(), k.key


def test_format_config_help_groups_sections():
    text = format_config_help(DocRoot, width=100)
    lines = text.splitlines()
    heads = [ln.split()[0] for ln in lines if ln and not ln.startswith(" ") and not ln.startswith("Config keys")]
    assert heads == ["top", "optim.*", "optim.leaf.*", "eval_optim.*", "eval_optim.leaf.*"]
    assert "optim.*  The optimizer section." in text  # a section's header: its class docstring
    assert re.search(r"^  steps +int = \(required\)\n +Required: no default\.$", text, re.M)
    assert re.search(r"^  eval_optim\.lr +float = 1\.0$", text, re.M)
    assert re.search(r"^  undocumented +bool = true\n +\(undocumented\)$", text, re.M)
    assert max(len(ln) for ln in lines if not ln.lstrip().startswith(("mode", "Config"))) <= 100


def test_every_train_config_field_has_a_docstring():
    """Document every new key with an attribute docstring (a string literal right below
    the field): `tools/train.py --help` prints it."""
    keys = list(config_keys(RealTrainConfig, sections=True))
    assert len(keys) > 50
    missing = [k.key for k in keys if not k.doc.strip()]
    assert not missing, f"config fields without a docstring: {missing}"


def test_train_help_lists_every_key_with_type_and_default():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    out = proc.stdout
    assert out.startswith("Train a stage: `torchrun") and "--resume" in out.splitlines()[1]
    keys = list(config_keys(RealTrainConfig))
    for k in keys:
        first_words = " ".join(k.doc.split()[:3])
        pattern = rf"^  {re.escape(k.key)} +{re.escape(k.type)} = {re.escape(k.default_text)}\n +{re.escape(first_words)}"
        assert re.search(pattern, out, re.M), k.key
    listed = re.findall(r"^  ([a-z_][a-z0-9_.]*) {2,}\S.* = ", out, re.M)
    assert listed == [k.key for k in keys]
    for key, tp, default in [
        ("optim.lr", "float", "0.0001"),
        ("data.max_seq_len", "int", "512"),
        ("dpo.beta", "float", "0.1"),
        ("max_consecutive_nonfinite", "int", "5"),
        ("dtype", "Literal['fp32', 'bf16']", "bf16"),
        ("data.paths", "list[str]", "[]"),
    ]:
        assert re.search(rf"^  {re.escape(key)} +{re.escape(tp)} = {re.escape(default)}$", out, re.M), key
    for section in ("trainable", "data", "optim", "init", "dpo", "video"):
        assert re.search(rf"^{section}\.\*  \S", out, re.M), section
    short = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--config", "x.yaml", "-h"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=True)
    assert short.stdout == out


def test_str_override_that_yaml_reads_as_a_mapping_keeps_its_text():
    from dataclasses import dataclass, field

    from llama_vision.config import load_config

    @dataclass
    class Task:
        prompt: str = ""
        data: dict = field(default_factory=dict)

    t = load_config(Task, None, ["prompt={question}", "data={format: jsonl}", "data.path=x.jsonl"])
    assert t.prompt == "{question}"
    assert t.data == {"format": "jsonl", "path": "x.jsonl"}  # a mapping still merges later keys
