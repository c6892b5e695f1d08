"""Training configuration: dataclasses, YAML files and dotted command-line overrides.

A config file is YAML with the SpikingResformer keys plus a ``plasticity:`` block::

    seed: 0
    epochs: 600
    model: spikingresformer_cifar
    dataset: cifar10
    plasticity:
      warmup_epochs: 100

``load_config("configs/cifar10.yaml", ["plasticity.enabled=false", "epochs=10"])`` reads the
file, applies the overrides (values parsed as YAML: ``false``, ``null``, ``[16, 32]``),
checks every key and type and the cross-field rules, and returns a :class:`TrainConfig`.
Every problem is a :class:`ConfigError` naming the key and what is allowed. The config
stays plain data: the builders in :mod:`dassdp.engine.builders` turn it into objects.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dassdp._util.io import atomic_write_text
from dassdp._util.yamlfile import YAMLInputError, load_yaml, read_yaml_file
from dassdp.plasticity.config import DASSDPConfig, DASSDPConfigError
from dassdp.plasticity.state import RESUMABLE_CONFIG

__all__ = [
    "AMP_MODES",
    "SYNTHETIC",
    "ConfigError",
    "PlasticityConfig",
    "TrainConfig",
    "TransformConfig",
    "amp_dtype",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dassdp_config",
    "load_config",
    "same_plasticity",
    "save_config",
]

SYNTHETIC = "synthetic"  # in-memory test/smoke dataset (see dassdp.engine.builders)
OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("fp16", "bf16")  # amp: false | true (= "fp16") | "fp16" | "bf16"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PLASTICITY_PRESETS = ("default", "compat")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or breaks a rule; the message names it.

    ``key``: the dotted key at fault when the message comes from elsewhere (the learner's
    config) and may not spell it, so that :func:`load_config` blames the right override.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class _PlasticityKeys:
    """The engine's own keys of the ``plasticity:`` block (see :class:`PlasticityConfig`)."""

    enabled: bool = True
    preset: str = "default"
    sites: str | None = None
    warmup_epochs: int = 100


def _yaml_type(tp: Any) -> Any:
    """The YAML-side type of a :class:`DASSDPConfig` annotation: tuples are lists in YAML."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_yaml_type(a) for a in args))
    if origin is tuple:
        items = {a for a in args if a is not Ellipsis}
        return list[items.pop()] if len(items) == 1 else list
    return tp


def _plasticity_class() -> type:
    """:class:`_PlasticityKeys` plus every other :class:`DASSDPConfig` field, typed as the
    learner types it (tuples as lists) or ``None``: the preset's value."""
    own = {f.name for f in dataclasses.fields(_PlasticityKeys)}
    hints = typing.get_type_hints(DASSDPConfig)
    passed = [
        (f.name, _yaml_type(hints[f.name]) | None, field(default=None))
        for f in dataclasses.fields(DASSDPConfig)
        if f.name not in own
    ]
    doc = """The ``plasticity:`` block: how DA-SSDP runs alongside training.

    The engine's own keys:

    Attributes:
        enabled: ``False`` keeps the learner attached but inert (bit-identical to no learner).
        preset: ``"default"`` (:class:`dassdp.DASSDPConfig`, the paper) or ``"compat"``
            (:meth:`dassdp.DASSDPConfig.compat`, the authors' released code).
        sites: the model's site preset (``"default"``, ``"compat"``, ``"classifier"``, ...);
            ``None``: the preset's.
        warmup_epochs: epochs that only record (S, L); must be < ``epochs``.

    Every other :class:`dassdp.DASSDPConfig` field is a key too (``A_plus``, ``sigma``,
    ``gate``, ``learn``, ...: see its docstring), typed as there with lists for tuples;
    ``None`` (unset) takes the preset's value. The engine names none of them: a new field of
    ``DASSDPConfig`` is a key here with no change to the engine, and the learner's config
    checks every value (:func:`dassdp_config`).
    """
    return dataclasses.make_dataclass(
        "PlasticityConfig",
        passed,
        bases=(_PlasticityKeys,),
        namespace={"__module__": __name__, "__doc__": doc},
    )


PlasticityConfig = _plasticity_class()


@dataclass
class TransformConfig:
    """The ``transform:`` block: how images and event frames are cropped, resized, normalised.

    ``None`` fields take the dataset's choice; see :mod:`dassdp.data.transforms`.

    Attributes:
        train_crop: ``"pad"`` (RandomCrop with padding size // 8; small images),
            ``"resized"`` (timm RandomResizedCrop with ``scale``/``ratio``; ImageNet) or ``"none"``.
        scale, ratio: ``[lo, hi]`` area fraction and aspect ratio of ``"resized"``.
        hflip: horizontal flip probability (default 0.5 on RGB images, 0 on grey).
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"lanczos"`` for
            resizes, crops and RandAugment (default bilinear; RandAugment then draws at random).
        crop_pct: evaluation centre crop: resize to ``input_size / crop_pct``, crop
            ``input_size`` (default 0.875 on ImageNet, 1.0 elsewhere).
        mean, std: normalisation per channel (default: the dataset's).
        event_channels: event frames: 2 (the polarities) or 3 (plus their sum, so that an
            ImageNet stem transfers whole).
    """

    train_crop: str | None = None
    scale: list[float] | None = None
    ratio: list[float] | None = None
    hflip: float | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    event_channels: int = 2


@dataclass
class TrainConfig:
    """One training run. Keys follow the SpikingResformer recipes where they exist.

    Attributes (units in brackets):
        name: run name; the run folder is ``runs/<name>`` (default: the config file's stem).
        seed: seeds python, numpy and torch (model init, data order, augmentation).
        epochs: total epochs.
        batch_size: per-process batch size [images].
        T: time steps; static images are repeated over T by the model.
        model: a registered model name (``dassdp ls models``).
        model_args: extra constructor arguments of the model (e.g. ``channels: [16, 32]``).
        dataset: one of :data:`dassdp.data.DATASETS` or ``"synthetic"`` (random in-memory
            images with a fixed seed, for tests and smoke runs).
        data_root: data folder (default: the user data cache, ``$DASSDP_DATA``).
        input_size: image side [px] (default: the dataset's).
        augment: ``None``, ``"standard"`` or a timm RandAugment string such as
            ``"rand-m7-n1-mstd0.5-inc1"`` (train split only); event frames: ``"standard"``
            (flip) or ``"nda"`` (flip + roll / rotate / cutout, the released DVS augmentation).
        transform: the :class:`TransformConfig` block (crop, interpolation, normalisation).
        mixup: batch Mixup/CutMix with timm's ``Mixup`` (alphas below); soft-target loss.
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: timm ``Mixup`` arguments.
        cutout: side of one zeroed square per training image [px]; 0: off.
        label_smoothing: label smoothing of the training loss.
        optimizer: ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        lr, weight_decay, momentum: optimizer settings (no decay on biases, norms, 1-D).
        lr_warmup_epochs, warmup_lr, min_lr: timm ``CosineLRScheduler`` (stepped per epoch).
        grad_clip: max gradient norm (any value > 0); ``None``: no clipping.
        amp: mixed precision: ``false`` (float32), ``"bf16"`` (bfloat16 autocast, no grad
            scaler; CPU and CUDA), ``"fp16"`` (float16 autocast + grad scaler; CUDA only: on
            CPU the run logs it and trains in float32) or ``true`` (= ``"fp16"``, the older
            spelling). Evaluation uses the same autocast dtype.
        compile: ``torch.compile`` the model for the training forward (DA-SSDP and firing-rate
            hooks stay on the uncompiled modules and still fire); evaluation runs eager.
        compile_mode: ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``; inductor only) or ``None``.
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` and
            ``"eager"`` compile fast and are what the tests use).
        channels_last: convert the model's 4-D (conv) weights to channels-last memory format
            (activations follow); pays off on CUDA tensor cores, runs on CPU too.
        cudnn_benchmark: ``torch.backends.cudnn.benchmark`` (autotuned conv algorithms; CUDA
            only, logged and ignored on CPU). Not bit-reproducible across runs.
        lif_backend: the LIF / PLIF implementation for every neuron layer of the model
            (:func:`dassdp.neurons.set_backend`): ``"auto"`` (Triton on CUDA after it passes a
            self-check, the compiled C kernels for large CPU layers, else fused torch ops),
            ``"loop"``, ``"torch"``, ``"cpu"`` or ``"triton"``. ``run.json`` records what
            each layer ran.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
        workers: DataLoader worker processes (default: 0 on CPU, 4 on CUDA).
        threads: ``torch.set_num_threads`` (default 1: on small shared CPUs 2+ can be slower);
            ``None`` leaves torch's default.
        sync_bn: SyncBatchNorm under DDP.
        subset, test_subset: train/test on a fixed random subset of this many samples.
        limit_train_batches: stop each training epoch after this many batches.
        pretrained: checkpoint to start from (transfer): tensors whose name and shape match
            are loaded, the rest (e.g. a new classifier) keep their initialisation.
        progress: tqdm progress bars (on a terminal).
        tensorboard: also log to TensorBoard when it is installed.
        plasticity: the DA-SSDP block, or ``None`` for no learner at all.
    """

    name: str | None = None
    seed: int = 0
    epochs: int = 100
    batch_size: int = 128
    T: int = 4
    model: str = "spiking_cnn"
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    input_size: int | None = None
    augment: str | None = None
    transform: TransformConfig = field(default_factory=TransformConfig)
    mixup: bool = False
    mixup_alpha: float = 0.5
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    cutout: int = 0
    label_smoothing: float = 0.0
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.01
    momentum: float = 0.9
    lr_warmup_epochs: int = 3
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    grad_clip: float | None = None
    amp: bool | str = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    lif_backend: str = "auto"
    device: str = "auto"
    workers: int | None = None
    threads: int | None = 1
    sync_bn: bool = False
    subset: int | None = None
    test_subset: int | None = None
    limit_train_batches: int | None = None
    pretrained: str | None = None
    progress: bool = True
    tensorboard: bool = True
    plasticity: PlasticityConfig | None = field(default_factory=PlasticityConfig)


# ---------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item)}"
    origin = typing.get_origin(tp)
    return getattr(origin or tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against annotation ``tp`` (ints accepted as floats); else ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(key, value, tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return _from_mapping(tp, value, prefix=f"{key}.")
    if origin is dict and isinstance(value, Mapping):
        return dict(value)
    if origin is list and isinstance(value, Sequence) and not isinstance(value, str):
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    out = _scalar(value, tp)
    if out is _NOT:
        raise _type_error(key, value, tp)
    return _in_int64(key, out) if tp is int else out


def _coerce_union(key: str, value: Any, tp: Any) -> Any:
    """``value`` as the first member of union ``tp`` that takes it; else ConfigError."""
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
            return _coerce(key, value, arg)  # a mapping's own key errors are the news
        if typing.get_origin(arg) is list and isinstance(value, list | tuple):
            return _coerce(key, value, arg)  # so are a list's item errors
        if arg is int and isinstance(value, int) and not isinstance(value, bool):
            return _coerce(key, value, arg)  # and an integer's range
        try:
            return _coerce(key, value, arg)
        except ConfigError:
            continue
    raise _type_error(key, value, tp)


_NOT = object()  # _scalar: the value is not of that type


def _scalar(value: Any, tp: Any) -> Any:
    """``value`` as scalar type ``tp`` (``None``, bool, int, float, str), or :data:`_NOT`."""
    if tp is type(None):
        return None if value is None else _NOT
    if tp is bool:
        return value if isinstance(value, bool) else _NOT
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT
    if tp is str:
        return value if isinstance(value, str) else _NOT
    if tp is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _NOT
    return _NOT


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    message = f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    return ConfigError(message, key=key)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _in_int64(key: str, value: int) -> int:
    """``value`` if a 64-bit signed integer holds it (what torch, numpy and the checkpoints
    store); else a :class:`ConfigError` naming ``key`` (not an overflow deep in a seeding)."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise ConfigError(f"{key} must be an integer in [-2**63, 2**63 - 1] (64-bit), got {value}")
    return value


def _from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)}; "
            f"allowed{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(allowed)}"
        )
    return cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})


# ---------------------------------------------------------------- loading


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from a (parsed YAML) mapping."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data)}")
    cfg = _from_mapping(TrainConfig, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain-data form of ``cfg`` (what ``config.yaml`` and checkpoints hold)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` / ``block.key=value`` overrides (values parsed as YAML) in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value or block.key=value")
        try:
            value = load_yaml(raw, f"override {item!r}") if raw.strip() else None
        except YAMLInputError as err:
            raise ConfigError(str(err)) from None
        *parents, leaf = key.strip().split(".")
        node = data
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                block = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {block} is {node[part]!r}, a value, not a block of "
                    f"keys, so {key.strip()} cannot be set (set {block}=VALUE)",
                    key=block,
                )
            node = node[part]
        node[leaf] = value
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply dotted overrides, validate; ``name`` defaults to the stem."""
    path = Path(path)
    data = read_config_file(path)
    apply_overrides(data, overrides)
    data.setdefault("name", path.stem)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{_blame(err, overrides, path)}: {err}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file; :class:`ConfigError` naming the file when it is
    empty, binary, not UTF-8, not valid YAML, repeats a key or holds no mapping."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = read_yaml_file(path)
    except YAMLInputError as err:
        raise ConfigError(str(err)) from None
    if data is None:
        raise ConfigError(
            f"{path} is empty (no keys): a config needs at least the keys that differ from "
            "the defaults, e.g. the ones in configs/*.yaml"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def _blame(err: ConfigError, overrides: Sequence[str], path: Path) -> str:
    """Where a config error comes from: the override(s) whose key the message names (or
    ``err.key``), else the file (an override's mistake must not send the user looking in
    the file)."""

    def names(key: str) -> bool:
        if err.key is not None and key.startswith(f"{err.key}."):
            return True  # `seed.x=1` made the key at fault, `seed`, a block
        return key == err.key or bool(re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", str(err)))

    named = [item for item in overrides if names(item.partition("=")[0].strip())]
    if not named:
        return str(path)
    return "override " + ", ".join(repr(item) for item in named)


def save_config(cfg: TrainConfig, path: str | Path, header: str = "") -> None:
    """Write the resolved config as YAML (``header`` lines become comments)."""
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write_text(path, lines + text)


# ---------------------------------------------------------------- rules


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Cross-field rules, registry names and ranges; raises :class:`ConfigError`."""
    for key in ("epochs", "batch_size", "T"):
        _require(getattr(cfg, key) >= 1, f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("lr", "weight_decay", "label_smoothing", "warmup_lr", "min_lr", "momentum"):
        value = getattr(cfg, key)
        _require(math.isfinite(value) and value >= 0, f"{key} must be >= 0, got {value}")
    _require(cfg.label_smoothing < 1, f"label_smoothing must be < 1, got {cfg.label_smoothing}")
    warm = cfg.lr_warmup_epochs
    _require(warm >= 0, f"lr_warmup_epochs must be >= 0, got {warm}")
    _require(cfg.cutout >= 0, f"cutout must be >= 0 [px], got {cfg.cutout}")
    _require(
        cfg.optimizer in OPTIMIZERS,
        f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}",
    )
    _require(
        cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
        f"device must be 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}",
    )
    for key in ("workers", "threads", "subset", "test_subset", "limit_train_batches", "input_size"):
        value = getattr(cfg, key)
        low = 0 if key == "workers" else 1
        _require(value is None or value >= low, f"{key} must be null or >= {low}, got {value}")
    _check_precision(cfg)
    _check_lif_backend(cfg.lif_backend)
    clip = cfg.grad_clip  # a max-norm: any positive value
    _require(
        clip is None or (math.isfinite(clip) and clip > 0),
        f"grad_clip must be null (no clipping) or a max gradient norm > 0, got {clip}",
    )
    _check_mixup(cfg)
    _check_dataset(cfg)
    _check_transform(cfg)
    learner = _check_plasticity(cfg) if cfg.plasticity is not None else None
    _check_model(cfg, learner)


def amp_dtype(amp: bool | str) -> Any:
    """The autocast dtype an ``amp`` value asks for: ``torch.float16``, ``torch.bfloat16`` or
    ``None`` (float32). ``True`` is ``"fp16"``. Raises :class:`ConfigError` for other values."""
    import torch

    if amp is False:
        return None
    if amp is True or amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    raise ConfigError(f"amp must be false, true (= fp16), {' or '.join(AMP_MODES)}, got {amp!r}")


def _check_precision(cfg: TrainConfig) -> None:
    amp_dtype(cfg.amp)
    mode, backend = cfg.compile_mode, cfg.compile_backend
    _require(
        mode is None or mode in COMPILE_MODES,
        f"compile_mode must be null or one of {', '.join(COMPILE_MODES)}, got {mode!r}",
    )
    if backend != "inductor":  # importing dynamo costs ~1 s: only for another backend
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        _require(
            backend in backends,
            f"compile_backend must be one of {', '.join(backends)}, got {backend!r}",
        )
    _require(
        mode is None or backend == "inductor",
        f"compile_mode ({mode!r}) needs compile_backend inductor, got {backend!r}",
    )


def _check_lif_backend(name: str) -> None:
    from dassdp.neurons.backends import backend_names

    names = backend_names()
    _require(name in names, f"lif_backend must be one of {', '.join(names)}, got {name!r}")


def _check_mixup(cfg: TrainConfig) -> None:
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(getattr(cfg, key) >= 0, f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("mixup_prob", "mixup_switch_prob"):
        _require(0 <= getattr(cfg, key) <= 1, f"{key} must be in [0, 1]")
    if cfg.mixup:
        _require(
            cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0,
            "mixup: true needs mixup_alpha > 0 or cutmix_alpha > 0",
        )
        _require(cfg.batch_size % 2 == 0, f"mixup needs an even batch_size, got {cfg.batch_size}")


def _check_dataset(cfg: TrainConfig) -> None:
    from dassdp.data import DATASETS

    allowed = (*DATASETS, SYNTHETIC)
    _require(
        cfg.dataset in allowed,
        f"dataset: unknown dataset {cfg.dataset!r}; allowed: {', '.join(allowed)}",
    )
    if cfg.data_root is not None:
        root = Path(cfg.data_root).expanduser()
        if not root.is_dir():
            raise ConfigError(
                f"data_root: no such folder {root}; create it with "
                f"`dassdp data prepare {cfg.dataset} --root {root}` or fix the path"
            )
    if cfg.pretrained is not None and not Path(cfg.pretrained).expanduser().is_file():
        raise ConfigError(f"pretrained: no such checkpoint file {cfg.pretrained}")


def _check_transform(cfg: TrainConfig) -> None:
    """``augment`` and the ``transform:`` block suit the dataset (images or event frames)."""
    from dassdp.data.transforms import check_augment, check_transform_options

    if cfg.dataset == SYNTHETIC:
        channels, event = 1, False
    else:
        from dassdp.data import dataset_info

        info = dataset_info(cfg.dataset)
        channels, event = info.in_channels, info.is_event
    try:
        check_augment(cfg.augment, event=event)
    except ValueError as err:
        raise ConfigError(f"augment: {err}") from None
    options = dataclasses.asdict(cfg.transform)
    if event:
        image_only = [k for k, v in options.items() if k != "event_channels" and v is not None]
        _require(
            not image_only,
            f"transform.{', transform.'.join(image_only)}: image options; {cfg.dataset} event "
            "frames take transform.event_channels only",
        )
        _require(cfg.cutout == 0, f"cutout applies to images; for {cfg.dataset} use augment: nda")
    try:
        check_transform_options(channels=channels, event=event, **options)
    except ValueError as err:
        raise ConfigError(f"transform.{err}") from None


def _check_model(cfg: TrainConfig, learner: DASSDPConfig | None) -> None:
    """The model name is registered, its ``model_args`` construct it (on the meta device),
    and it declares the learner's site preset."""
    import torch

    from dassdp.models.registry import create_model, is_model, list_models

    if not is_model(cfg.model):
        raise ConfigError(
            f"model: unknown model {cfg.model!r}; allowed: {', '.join(list_models())}"
        )
    reserved = sorted({"num_classes", "T", "in_channels"} & set(cfg.model_args))
    _require(
        not reserved,
        f"model_args.{', model_args.'.join(reserved)}: set by the dataset and the top-level T",
    )
    try:
        with torch.device("meta"):
            model = create_model(cfg.model, T=cfg.T, **cfg.model_args)
    except (
        TypeError,
        ValueError,
        RuntimeError,
        ArithmeticError,
        AssertionError,
        IndexError,
    ) as err:
        raise ConfigError(_model_args_error(cfg, err)) from None
    if learner is not None and hasattr(model, "dassdp_sites"):
        try:
            model.dassdp_sites(learner.sites)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"plasticity.sites: {err}") from None


def _model_args_error(cfg: TrainConfig, err: Exception) -> str:
    """One line for a model that cannot be built from ``model_args``: ``model_args.<key>``
    first when the model's message starts with one of its keys (the built-in models check
    theirs), else the model, its arguments and the first line of the error (torch's shape
    errors carry a C++ backtrace)."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    unknown = re.search(r"unexpected keyword argument '(\w+)'", reason)
    if unknown:
        return f"model_args.{unknown.group(1)}: {cfg.model} takes no such argument ({reason})"
    head = re.match(r"[A-Za-z_]\w*", reason)
    if head and head.group() in cfg.model_args:
        return f"model_args.{reason} ({cfg.model})"
    given = ", ".join(f"model_args.{k}={v!r}" for k, v in cfg.model_args.items()) or "no model_args"
    return f"model_args: {cfg.model} cannot be built with {given} ({reason})"


# ---------------------------------------------------------------- the plasticity block

# Learner errors the engine worded itself before the learner's config checked them: they
# keep reading ``plasticity.<key> ...``; every other one reads ``plasticity: <its message>``.
_DOTTED_ERRORS = frozenset({"sigma", "warmup_epochs"})


def dassdp_config(p: PlasticityConfig, seed: int = 0) -> DASSDPConfig:
    """The :class:`dassdp.DASSDPConfig` of a plasticity block: the preset, then every value
    the block sets (``seed``, unless set, is the run's). Built once per run: memoised on the
    block's values, so validating the config and building the learner share one object.

    Raises:
        ConfigError: the preset is unknown, or the learner's config rejects a value (the
            message names ``plasticity`` and the key).
    """
    _require(
        p.preset in PLASTICITY_PRESETS,
        f"plasticity.preset must be one of {', '.join(PLASTICITY_PRESETS)}, got {p.preset!r}",
    )
    values = {
        f.name: _frozen(getattr(p, f.name))
        for f in dataclasses.fields(p)
        if f.name != "preset" and getattr(p, f.name) is not None
    }
    return _learner_config(p.preset, tuple(values.items()), seed)


def _frozen(value: Any) -> Any:
    """A hashable copy of a config value (lists become tuples, as the learner stores them)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, _frozen(v)) for k, v in value.items())
    return value


@functools.lru_cache(maxsize=32)
def _learner_config(preset: str, values: tuple[tuple[str, Any], ...], seed: int) -> DASSDPConfig:
    explicit = {"seed": seed, **dict(values)}
    build = DASSDPConfig.compat if preset == "compat" else DASSDPConfig
    try:
        return build(**explicit)
    except DASSDPConfigError as err:
        text, key = str(err), err.key
        sep = "." if key in _DOTTED_ERRORS and text.startswith(f"{key} ") else ": "
        raise ConfigError(f"plasticity{sep}{text}", key=f"plasticity.{key}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"plasticity: {err}") from None


def _check_plasticity(cfg: TrainConfig) -> DASSDPConfig:
    """The learner's config (every value checked there) and the engine's one rule on top."""
    p = cfg.plasticity
    learner = dassdp_config(p, seed=cfg.seed)
    if p.enabled:
        _require(
            p.warmup_epochs < cfg.epochs,
            f"plasticity.warmup_epochs ({p.warmup_epochs}) must be < epochs ({cfg.epochs}): the "
            "gate is fitted after warm-up, so DA-SSDP would never change a weight; lower it, "
            "raise epochs, or set plasticity.enabled=false",
        )
    return learner


def same_plasticity(old: Any, new: Any) -> bool:
    """Whether two saved ``plasticity`` blocks (mappings, or ``None``) configure the same
    learner: a key one of them lacks (added since it was saved) or leaves unset means the
    preset's value, so only the resolved :class:`dassdp.DASSDPConfig` is compared; the fields a
    learner state may change on load (``RESUMABLE_CONFIG``: its checks) are not compared."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return old == new
    try:
        blocks = (_from_mapping(PlasticityConfig, x, "plasticity.") for x in (old, new))
        a, b = (dassdp_config(block) for block in blocks)
    except ConfigError:
        return False
    free = {name: False for name in RESUMABLE_CONFIG}  # every such field is a bool
    return dataclasses.replace(a, **free) == dataclasses.replace(b, **free)
