"""Config files as a user writes them: a repeated key, a binary or non-UTF-8 file, an empty
file, integers no 64-bit field holds, impossible model sizes. Each is one line naming the
file, key or value, exit status 2, and no run folder (``dassdp train`` through ``main``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dassdp._util.yamlfile import YAMLInputError, load_yaml, read_yaml_file
from dassdp.cli import main
from dassdp.engine import ConfigError, load_config
from engine_fixtures import tiny_dict


def write_config(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def train_error(tmp_path: Path, capsys: pytest.CaptureFixture, config: Path, *overrides: str):
    """``dassdp train`` of ``config``: its exit status and its one stderr line; asserts that
    no run folder was made and nothing went to stdout."""
    run = tmp_path / "run"
    code = main(["train", "-c", str(config), "--out", str(run), *overrides])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == "" and not run.exists()
    return code, lines[0]


def tiny_yaml(**changes: object) -> str:
    return yaml.safe_dump(tiny_dict(**changes), sort_keys=False)


# ---------------------------------------------------------------- repeated keys


def test_a_repeated_key_is_an_error_naming_it_and_both_lines(tmp_path, capsys):
    """Regression: `epochs: 2 ... epochs: 5` trained 5 epochs without a word."""
    text = tiny_yaml() + "seed: 3\nepochs: 5\n"
    first = tiny_yaml().splitlines().index("epochs: 2") + 1
    second = len(text.splitlines())
    config = write_config(tmp_path / "dup.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    expected = f"{config}: key 'epochs' is given twice (lines {first} and {second}); keep one"
    assert str(err.value) == expected
    code, line = train_error(tmp_path, capsys, config)
    assert code == 2 and line == f"dassdp train: error: {expected}"


def test_a_repeated_key_inside_a_block_or_a_flow_mapping_is_an_error(tmp_path):
    data = tiny_dict()
    del data["plasticity"]
    block = "plasticity:\n  warmup_epochs: 1\n  A_plus: 1.0e-3\n  warmup_epochs: 0\n"
    nested = write_config(tmp_path / "nested.yaml", yaml.safe_dump(data) + block)
    n = len(nested.read_text().splitlines())
    with pytest.raises(
        ConfigError, match=rf"'warmup_epochs' is given twice \(lines {n - 2} and {n}\)"
    ):
        load_config(nested)
    with pytest.raises(ConfigError, match=r"override 'model_args=\{hidden: 8, hidden: 16\}': key "):
        load_config(
            write_config(tmp_path / "ok.yaml", tiny_yaml()), ["model_args={hidden: 8, hidden: 16}"]
        )


def test_yaml_merge_keys_still_override_what_they_merge():
    """`<<: *base` then a key of base is YAML's override, not a repeated key."""
    text = "base: &b {epochs: 2, seed: 1}\nrun:\n  <<: *b\n  epochs: 5\n"
    assert load_yaml(text) == {"base": {"epochs": 2, "seed": 1}, "run": {"epochs": 5, "seed": 1}}
    assert load_yaml(text) == yaml.safe_load(text)  # same as PyYAML where nothing repeats


def test_ls_model_args_refuse_a_repeated_key(capsys):
    code = main(["ls", "sites", "spiking_cnn", "--model-args", "{hidden: 8, hidden: 16}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "dassdp ls: error: --model-args: key 'hidden' is given twice (on line 1); keep one"
    ]


# ---------------------------------------------------------------- file contents


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"\x7fELF\x02\x01\x01\x00\x00\x00epochs: 3\n",
            "is a binary file (it holds NUL bytes), not YAML text",
        ),
        (b"name: caf\xe9\nseed: 1\n", "is not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8"),
    ],
)
def test_a_binary_or_non_utf8_config_is_one_line_naming_the_file(
    tmp_path, capsys, content, expected
):
    """Regression: "'utf-8' codec can't decode byte ..." without the file's name."""
    config = write_config(tmp_path / "bad.yaml", content)
    code, line = train_error(tmp_path, capsys, config)
    assert code == 2 and line == f"dassdp train: error: {config} {expected}"


@pytest.mark.parametrize("content", ["", "\n\n", "# epochs: 3\n"])
def test_an_empty_config_file_says_it_is_empty(tmp_path, capsys, content):
    """Regression: an empty file loaded as all defaults and failed on warm-up vs epochs."""
    config = write_config(tmp_path / "empty.yaml", content)
    code, line = train_error(tmp_path, capsys, config)
    assert code == 2 and line.startswith(f"dassdp train: error: {config} is empty (no keys)")
    assert "warmup" not in line


def test_a_utf8_config_with_a_byte_order_mark_loads(tmp_path):
    config = write_config(tmp_path / "bom.yaml", "\ufeff" + tiny_yaml(seed=4))
    assert load_config(config).seed == 4


def test_read_yaml_file_errors_are_value_errors_of_one_line(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", "a: [1\nb: 2\n")
    with pytest.raises(YAMLInputError) as err:
        read_yaml_file(bad)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{bad}: not valid YAML: ") and "(line 2, column " in str(
        err.value
    )


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=100000000000000000000000", "seed"),
        ("seed=-9223372036854775809", "seed"),
        ("workers=100000000000000000000", "workers"),
        ("plasticity.warmup_epochs=100000000000000000000", "plasticity.warmup_epochs"),
    ],
)
def test_integers_beyond_64_bits_name_the_key(tmp_path, override, key):
    """Regression: `seed=1e23`-style integers failed with "Overflow when unpacking long long"
    (and a `workers` count that large was accepted). Checked on the config, not by
    training: such a worker count would start processes until the machine gives out."""
    config = write_config(tmp_path / "tiny.yaml", tiny_yaml())
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    value = override.partition("=")[2]
    assert str(err.value) == (
        f"override {override!r}: {key} must be an integer in [-2**63, 2**63 - 1] (64-bit), "
        f"got {value}"
    )


def test_a_seed_beyond_64_bits_is_one_line_from_the_cli(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_yaml())
    code, line = train_error(tmp_path, capsys, config, "seed=100000000000000000000000")
    assert code == 2 and line.startswith("dassdp train: error: override 'seed=1000")
    assert line.endswith(
        "seed must be an integer in [-2**63, 2**63 - 1] (64-bit), got " + "1" + "0" * 23
    )


def test_the_largest_64_bit_seed_is_accepted(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", tiny_yaml())
    assert load_config(config, [f"seed={2**63 - 1}"]).seed == 2**63 - 1


def test_input_size_zero_is_refused_not_replaced_by_the_default(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_yaml())
    code, line = train_error(tmp_path, capsys, config, "input_size=0")
    assert code == 2 and line.endswith("input_size must be null or >= 1, got 0")


@pytest.mark.parametrize(
    ("model", "override", "message"),
    [
        (
            "spiking_cnn",
            "model_args.channels=[16, -32]",
            "model_args.channels[1] must be an integer >= 1, got -32 (spiking_cnn)",
        ),
        (
            "spiking_cnn",
            "model_args.hidden=0",
            "model_args.hidden must be an integer >= 1, got 0 (spiking_cnn)",
        ),
        (
            "spikingresformer_cifar",
            "model_args.dims=[64, 0, 384]",
            "model_args.dims[1] must be an integer >= 1, got 0 (spikingresformer_cifar)",
        ),
        (
            "spiking_cnn",
            "model_args.width=3",
            "model_args.width: spiking_cnn takes no such argument",
        ),
    ],
)
def test_impossible_model_args_name_the_key(tmp_path, capsys, model, override, message):
    """Regression: `channels: [16, -32]` was a 43-line RuntimeError from torch."""
    args = {} if model != "spiking_cnn" else {"channels": [4, 8], "hidden": 16}
    config = write_config(tmp_path / "m.yaml", tiny_yaml(model=model, model_args=args))
    code, line = train_error(tmp_path, capsys, config, override)
    assert code == 2 and line.startswith(f"dassdp train: error: override {override!r}: {message}")


def test_a_model_without_its_own_checks_fails_in_one_line(tmp_path, capsys):
    """A registered model that leaves sizes to torch: the first line of torch's error."""
    from torch import nn

    from dassdp.models.registry import _MODELS, register_model

    @register_model(name="bare_linear_for_test")
    def bare(num_classes: int = 10, T: int = 4, in_channels: int = 1, width: int = 8) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, width))

    try:
        config = write_config(tmp_path / "m.yaml", tiny_yaml(model="bare_linear_for_test"))
        data = yaml.safe_load(config.read_text())
        data.pop("model_args")
        data["plasticity"] = None
        config.write_text(yaml.safe_dump(data))
        code, line = train_error(tmp_path, capsys, config, "model_args.width=-3")
    finally:
        _MODELS.pop("bare_linear_for_test")
    assert code == 2 and line.startswith(
        "dassdp train: error: override 'model_args.width=-3': model_args: bare_linear_for_test "
        "cannot be built with model_args.width=-3 (Trying to create tensor with negative "
    )
