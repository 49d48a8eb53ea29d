"""One config tree: dataclass defaults <- a YAML recipe of changes <- `--set a.b=value` overrides.

A recipe holds only what differs from the defaults, or from the recipe it names as `base: other.yaml`.
Related fields sit in groups (loss.dim_sampling, loss.distill, loss.two_d, loss.quantisation, speed). Unknown keys
and values of the wrong type fail at load time with the field's dotted name, before any model or data is touched:
each field declares the check of its own value beside its default (`option`, run by `check_fields`), and
`validate` adds those that relate fields to each other. Dataset specs are dicts of `datasets.load_dataset`
keyword arguments plus keys of ours (see `mrl.data.load_table`, and `mrl/data/mixture.py` for a mixture's).
"""

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from mrl.cli import naming
from mrl.loss.base import LOSSES, check_columns
from mrl.loss.matryoshka import check_dims, check_weights
from mrl.model.pooling import POOLING_MODES
from mrl.loss.quantisation import REGULARISERS, check_quantisation, precision_weights
from mrl.loss.two_d import check_layers_per_step
from mrl.loss.variants import DIM_WEIGHT_RULES, check_dim_sampling

STSB = "sentence-transformers/stsb"
DTYPES = ("float32", "float64", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def option(default, check=None):
    """A config field: its default (a list or dict is copied for each config) and `check`, the check of its value
    alone: check(value) -> what the value must be ("must be >= 1"), or None when it is fine; or a ValueError of its
    own. check_fields names the field, adds " or null" where the field may be None (None always passes) and the
    value given."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def at_least(n):
    return lambda value: None if value >= n else f"must be >= {n}"


def above(x):
    return lambda value: None if value > x else f"must be > {x}"


def within(lo, hi):
    """lo <= value < hi."""
    return lambda value: None if lo <= value < hi else f"must be in [{lo}, {hi})"


def one_of(*choices):
    """Two choices read "expected a | b", more "expected one of a | b | c"."""
    listed = ("one of " if len(choices) > 2 else "") + " | ".join(choices)
    return lambda value: None if value in choices else f"expected {listed}"


def names_to_texts(value: dict):
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return "expected a mapping of names to texts"


def weights_or_rule(value: list | str):
    """loss.dim_weights: a list (checked against loss.dims in validate) or the name of a rule."""
    if isinstance(value, str) and value not in (rules := (*DIM_WEIGHT_RULES, "learned")):
        return f"expected a list of numbers or one of {' | '.join(rules)}"


@dataclass
class ModelConfig:
    name: str = "sentence-transformers/all-MiniLM-L6-v2"  # hub id or local folder (HF or sentence-transformers)
    # None: the model's own (sentence_bert_config.json), else the tokenizer's
    max_seq_length: int | None = option(None, at_least(1))
    normalize: bool | None = None  # L2-normalise the output; None: as the saved model says (True for plain HF)
    # add a new Dense projection head to this width (the reduced-dim recipe)
    dense_dim: int | None = option(None, at_least(1))
    dense_activation: str = "tanh"
    # the weights' dtype: float32 | float64 | bfloat16 | float16 (mixed precision: train.*)
    dtype: str = option("float32", one_of(*DTYPES))
    # mean | cls | lasttoken; None: as the saved model says (a plain HF model: mean)
    pooling: str | None = option(None, one_of(*POOLING_MODES))
    include_prompt: bool | None = None  # False: prompt tokens left out of the pooled embedding; None: as saved
    # named prompts added to the model's and saved with it, e.g. {query: "query: "}
    prompts: dict | None = option(None, names_to_texts)
    append_eos: bool = False  # end every text with the EOS token (last-token pooling of decoders that need it)
    lora: "LoraConfig" = field(default_factory=lambda: LoraConfig())


@dataclass
class LoraConfig:  # model.lora: train low-rank adapters instead of the backbone's weights (peft; mrl/model/lora.py)
    enabled: bool = False
    r: int = option(16, at_least(1))  # the adapters' rank
    alpha: float = option(32.0, above(0))  # their scale is alpha / r
    dropout: float = option(0.05, within(0, 1))
    target_modules: list[str] | str = "all-linear"  # which of the backbone's Linear layers get an adapter
    # merged: the adapters merged into the weights, a plain model | adapter: the adapter alone
    save: str = option("merged", one_of("merged", "adapter"))


@dataclass
class DataConfig:
    train: dict = option({"path": STSB, "split": "train"})
    no_duplicates: bool | None = None  # a text appears at most once per batch; None: on for contrastive losses
    # with several datasets in data.train: proportional | round_robin (mrl/data/mixture.py)
    mixture: str = option("proportional", one_of("proportional", "round_robin"))
    # a prompt per text column: a name of the model's prompts (model.prompts) or the text itself,
    # e.g. {anchor: query, positive: document, negative: document}
    prompts: dict | None = option(None, names_to_texts)
    num_workers: int = 0  # DataLoader workers (they pad the token ids into batches, in the collate function)
    # processes that check and tokenise each training table up front (datasets.map, cached: a later run reads
    # the cache), on the first process of each node while the others wait; None: the machine's cores; 1: in this
    # process. At least 20k rows a process (mrl.data.tables.map_workers); the tokens are the same for any number
    num_proc: int | None = option(None, at_least(1))
    # read data.train as it trains (datasets' streaming; mrl/data/stream.py): no disk cache, no tokens up front.
    # The same batches as the map-style path when the table fits in shuffle_buffer rows; one dataset, needs
    # train.max_steps
    streaming: bool = False
    shuffle_buffer: int = option(100_000, at_least(1))  # streaming: rows shuffled together (two windows in memory)


@dataclass
class DimSamplingConfig:  # loss.dim_sampling: train a few of the dims per step (mrl.loss.variants.DimSampler)
    dims_per_step: int | None = None  # None: every dim, every step (plain MRL)
    schedule: str = option("random", one_of("random", "cyclic"))  # random | cyclic (each dim in turn, equally often)
    always_full: bool = False  # the largest dim is always one of them


@dataclass
class DistillConfig:  # loss.distill: prefix self-distillation (mrl.loss.variants.PrefixDistillation)
    weight: float = option(0.0, at_least(0))  # 0: off; else w in L + w·Σ_d KL(P_full ‖ P_d)
    temperature: float = option(0.05, above(0))


@dataclass
class TwoDConfig:  # loss.two_d: 2D Matryoshka (mrl.loss.two_d.Matryoshka2dLoss): also train earlier layers' embeddings
    enabled: bool = False
    layers_per_step: int = option(1, at_least(1))  # earlier layers trained per step, drawn at random
    layer_weight: float = 1.0  # weight of an earlier layer's Matryoshka loss
    kl_weight: float = 1.0  # weight of the KL toward the last layer's similarity distribution
    kl_temperature: float = 0.3


@dataclass
class TeacherConfig:  # loss.teacher: distil a teacher into every prefix (mrl.loss.variants.TeacherDistillation)
    # a model folder or hub id: its embeddings of every training text are computed once, before training;
    # "data": they come with the data, a column "<text column>.teacher" of each table; None: off
    model: str | None = None
    # the KL from the teacher's in-batch similarity distribution to each prefix's
    kl_weight: float = option(1.0, at_least(0))
    temperature: float = option(0.05, above(0))
    # MSE from each prefix to the teacher's, truncated alike (the widths must match)
    mse_weight: float = option(0.0, at_least(0))


@dataclass
class QuantisationConfig:  # loss.quantisation: train every prefix as stored (mrl.loss.quantisation.QuantisedPrefixes)
    # each precision's weight λ in L + Σ_p λ_p Σ_d L(prefix d stored at p), its codes through a straight-through
    # estimator; 0: off
    int8: float = option(0.0, at_least(0))
    int4: float = option(0.0, at_least(0))
    binary: float = option(0.0, at_least(0))  # by sign, scored with the scaled cosine 1 − 2·Hamming/d
    # the int8 / int4 range of each coordinate: its max |x| over this many training texts, embedded at full width
    # and unit-normalised by the model before training (kept in checkpoints and the saved folder)
    calibration_rows: int = option(1024, at_least(1))
    range: float | None = option(None, above(0))  # or one fixed symmetric range [−range, range]; None: calibrated
    # of the float prefixes: spread_out | orthogonality (formulas in mrl/loss/quantisation.py); None: none
    regulariser: str | None = option(None, one_of(*REGULARISERS))
    regulariser_weight: float = option(0.0, at_least(0))


@dataclass
class LossConfig:
    name: str = option("cosent", one_of(*LOSSES))  # one of mrl.loss.base.LOSSES: cosent | contrastive
    scale: float = 20.0  # inverse temperature on cosines
    symmetric: bool = False  # contrastive only: also score positives -> anchors
    matryoshka: bool = True  # False: the base loss at full width only (the baseline)
    dims: list[int] = option([384, 256, 128, 64, 32, 16, 8], check_dims)
    # one weight per dim, or a rule: uniform | proportional | inverse_sqrt | inverse (mrl.loss.variants.DIM_WEIGHT_RULES)
    # | learned (uncertainty weighting, trained at dim_weight_lr); None: all 1
    dim_weights: list[float] | str | None = option(None, weights_or_rule)
    # peak learning rate of the learned dim weights (own group, same schedule)
    dim_weight_lr: float = option(1e-2, above(0))
    # contrastive: score each anchor against the candidates of every process (mrl/loss/dist.py);
    # None: on whenever a contrastive run has several processes
    cross_device: bool | None = None
    # contrastive: leave out of an anchor's denominator each candidate it scores above its own positive plus
    # this margin, at full width (likely false negatives; mrl.loss.base.false_negatives); None: off
    false_negative_margin: float | None = None
    dim_sampling: DimSamplingConfig = field(default_factory=DimSamplingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    two_d: TwoDConfig = field(default_factory=TwoDConfig)
    quantisation: QuantisationConfig = field(default_factory=QuantisationConfig)


@dataclass
class TrainConfig:
    batch_size: int = option(16, at_least(1))  # per process, per forward
    epochs: int = option(1, at_least(1))
    max_steps: int | None = option(None, at_least(1))  # optimiser steps; stops before the epochs run out if set
    lr: float = option(2e-5, above(0))
    # linear warm-up over this fraction of the steps, then linear decay to 0
    warmup_ratio: float = option(0.1, within(0, 1))
    weight_decay: float = 0.01  # AdamW, not applied to biases and LayerNorm weights
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    grad_accum: int = option(1, at_least(1))  # gradient accumulation steps per optimiser step
    mixed_precision: str | bool = option("no", one_of("no", "bf16", "fp16"))  # no | bf16 | fp16
    seed: int = 0
    drop_last: bool = False  # drop a last, smaller batch of each epoch
    save_every: int = 0  # checkpoint every N optimiser steps (0: only at the end)
    # GradCache (mrl/run/gradcache.py): embed the batch in chunks of this many texts, exactly; memory of one chunk
    cache_chunk_size: int | None = option(None, at_least(1))
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, more time


@dataclass
class SpeedConfig:  # how a batch is computed, never what: each option gives the same embeddings (mrl/run/speed.py)
    # embed each batch as this many forwards over texts of similar length (less padding);
    # None: 1 on a GPU (launch-bound at small batches), on a CPU (compute-bound) groups of about 32 texts, at
    # least 2 (2 for 16 STS pairs, 12 for 128 NLI triplets). GradCache embeds in its own chunks instead
    length_groups: int | None = option(None, at_least(1))
    # pad every batch (and length group) up to a multiple of this many tokens, at most max_seq_length: a few
    # shapes instead of one per length, as torch.compile / CUDA graphs need; None: to its longest text
    pad_to_multiple_of: int | None = option(None, at_least(1))
    # torch.compile the encoder's training forward (and so its backward) in this mode: default | reduce-overhead
    # (CUDA graphs on a GPU) | max-autotune | max-autotune-no-cudagraphs; None: eager. Needs pad_to_multiple_of
    compile: str | None = option(None, one_of(*COMPILE_MODES))


@dataclass
class EvalConfig:
    dev: dict | None = option({"path": STSB, "split": "validation"})
    test: dict | None = option({"path": STSB, "split": "test"})
    dims: list[int] | None = option(None, check_dims)  # None: loss.dims
    layers: list[int] | None = None  # also evaluate the embeddings of the first k layers, for each k here (2D)
    prompt: str | None = None  # a prompt for both sentences of the STS pairs: a name of the model's prompts, or text
    every: int = 0  # evaluate on dev every N optimiser steps (0: at the start and end only)
    at_start: bool = True  # evaluate the untrained model too (the "before training" row)
    batch_size: int = 128


@dataclass
class LogConfig:
    every: int = 10  # log losses every N optimiser steps
    # YAML key `with`: Accelerate trackers, e.g. [tensorboard, wandb]; one name alone (log.with=tensorboard) is fine
    with_: list[str] | str = option([])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    output_dir: str = "runs/default"
    mirror: str | None = "configs/mirror.yaml"  # local copies of hub ids (see mrl.sources); None: hub only

    def to_dict(self) -> dict:
        return _to_dict(self)


def _key(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")  # `with_` is written `with`


def _to_dict(obj) -> dict:
    return {_key(f): _to_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
            for f in dataclasses.fields(obj)}


def _coerce(value, annotation, name: str):
    """Return `value` as `annotation` (int -> float, '3e-5' -> float) or raise naming the field."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except TypeError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if number is not None:
            return number
    if annotation is dict and isinstance(value, dict):
        return value
    if annotation in (int, str, bool, float) and isinstance(value, annotation) and not (
            annotation is int and isinstance(value, bool)):
        return value
    raise TypeError(f"{name}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _merge(obj, changes: dict, prefix: str = "") -> None:
    fields = {_key(f): f for f in dataclasses.fields(obj)}
    for key, value in changes.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"{name}: unknown config key; expected one of {sorted(fields)}")
        current = getattr(obj, fields[key].name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"{name}: expected a mapping of {sorted(_key(f) for f in dataclasses.fields(current))}")
            _merge(current, value, f"{name}.")
        else:
            setattr(obj, fields[key].name, _coerce(value, fields[key].type, name))


def apply_override(cfg: Config, text: str) -> None:
    """`--set KEY=VALUE`: 'train.lr=3e-5' sets one field, the value read as YAML ('[64, 8]' is a list). A key
    past a dataset spec changes that key of the spec alone: 'data.train.split=train[:100]' keeps its path."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-5")
    key, raw = text.split("=", 1)
    parts, value = key.strip().split("."), yaml.safe_load(raw)
    obj = cfg
    for i, part in enumerate(parts):
        fields, name = {_key(f): f for f in dataclasses.fields(obj)}, ".".join(parts[:i + 1])
        if part not in fields:
            raise ValueError(f"{name}: unknown config key; expected one of {sorted(fields)}")
        current, inside = getattr(obj, fields[part].name), parts[i + 1:]
        if dataclasses.is_dataclass(current) and inside:
            obj = current
            continue
        if inside:  # a key inside a mapping-valued field (a dataset spec)
            if not isinstance(current, (dict, type(None))):
                raise ValueError(f"--set {key}: {name} is not a mapping (it is {current!r})")
            spec = dict(current or {})
            target = spec
            for inner in inside[:-1]:
                target = target.setdefault(inner, {})
            target[inside[-1]] = value
            value = spec
        _merge(obj, {part: value}, name[:-len(part)])
        return


def read_recipe(path: str, _seen: tuple = ()) -> list[dict]:
    """The changes of a YAML recipe, after those of the recipe it names as `base` (relative to its folder)."""
    if path in _seen:
        raise ValueError(f"{path}: `base` recipes form a cycle: {' -> '.join(_seen + (path,))}")
    try:
        with open(path, encoding="utf-8") as f:
            changes = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable YAML file: {error}".replace("\n", " ")) from None
    if not isinstance(changes, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections (model:, data:, loss:, train:, ...), got "
                         f"{type(changes).__name__} {changes!r:.60}")
    base = changes.pop("base", None)
    if base is None:
        return [changes]
    return read_recipe(os.path.join(os.path.dirname(path), base), _seen + (path,)) + [changes]


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML recipe at `path` (after its bases), then each `KEY=VALUE` override; validated."""
    cfg = Config()
    for changes in read_recipe(path) if path is not None else []:
        _merge(cfg, changes)
    for override in overrides:
        apply_override(cfg, override)
    validate(cfg)
    return cfg


def flat_dict(cfg: Config) -> dict:
    """{'loss.dim_sampling.schedule': 'random', ...}: every field as one level of scalars (lists, dataset specs
    and None as text), as experiment trackers take hyperparameters."""
    def flatten(obj, prefix: str):
        for f in dataclasses.fields(obj):
            value, name = getattr(obj, f.name), prefix + _key(f)
            if dataclasses.is_dataclass(value):
                yield from flatten(value, name + ".")
            else:
                yield name, str(value) if isinstance(value, (list, dict, type(None))) else value
    return dict(flatten(cfg, ""))


def check_fields(obj, prefix: str = "") -> None:
    """Run the check declared beside each field (`option`) on its value, naming the dotted field
    (loss.dim_sampling.schedule; log.with for `with_`). None passes: _coerce lets it in only where the field's
    type has None, as "off" or "as the model says"."""
    for f in dataclasses.fields(obj):
        value, name, check = getattr(obj, f.name), prefix + _key(f), f.metadata.get("check")
        if dataclasses.is_dataclass(value):
            check_fields(value, name + ".")
        elif check is not None and value is not None:
            with naming(name):
                problem = check(value)
            if problem:
                or_null = " or null" if type(None) in typing.get_args(f.type) else ""
                raise ValueError(f"{name}: {problem}{or_null}, got {value!r}")


def validate(cfg: Config) -> None:
    """Every check that needs no model or data, naming the field: each field's own (check_fields), then here
    those that relate fields to each other; check_against_model and check_train_columns run once the model and
    a training table are loaded. Every check of the config is in this module. Writes log.with as a list and a
    mixed precision of false as "no"."""
    loss, sampling, train, speed = cfg.loss, cfg.loss.dim_sampling, cfg.train, cfg.speed
    if isinstance(cfg.log.with_, str):
        cfg.log.with_ = [cfg.log.with_]
    if train.mixed_precision is False or train.mixed_precision == "False":  # YAML reads a bare `no` as false
        train.mixed_precision = "no"
    check_fields(cfg)

    if isinstance(loss.dim_weights, list):
        with naming("loss.dim_weights"):
            check_weights(loss.dim_weights, loss.dims)
    if sampling.dims_per_step is None:
        for name, value, default in (("schedule", sampling.schedule, "random"),
                                     ("always_full", sampling.always_full, False)):
            if value != default:
                raise ValueError(f"loss.dim_sampling.{name}: only has an effect with "
                                 f"loss.dim_sampling.dims_per_step set (got {value!r})")
    with naming("loss.dim_sampling."):
        check_dim_sampling(len(loss.dims), sampling.dims_per_step, sampling.schedule, sampling.always_full)
    quantisation = loss.quantisation
    with naming("loss.quantisation."):
        check_quantisation(precision_weights(quantisation), quantisation.regulariser, quantisation.regulariser_weight)
    if quantisation.range is not None and not (quantisation.int8 or quantisation.int4):
        raise ValueError(f"loss.quantisation.range: sets the int8 / int4 ranges, but neither is trained (got "
                         f"{quantisation.range})")
    if not loss.matryoshka:
        if loss.teacher.model is not None:
            raise ValueError("loss.teacher: distils into the Matryoshka loss's prefixes, but loss.matryoshka is false")
        for name, value, default in (("dim_weights", loss.dim_weights, None),
                                     ("dim_sampling.dims_per_step", sampling.dims_per_step, None),
                                     ("distill.weight", loss.distill.weight, 0.0)):
            if value != default:
                raise ValueError(f"loss.{name}: is an option of the Matryoshka loss, but loss.matryoshka is false")

    train_specs = named_specs(cfg.data.train)
    for name, spec in [*((dataset_field(n, train_specs), s) for n, s in train_specs.items()),
                       ("eval.dev", cfg.eval.dev), ("eval.test", cfg.eval.test)]:
        if spec is not None and (not isinstance(spec, dict) or "path" not in spec):
            raise ValueError(f"{name}: a dataset spec needs `path` (a hub id, or csv/json/parquet with data_files)")
    for name, spec in train_specs.items():
        where = dataset_field(name, train_specs)
        if dataset_loss(spec, loss.name) not in LOSSES:
            raise ValueError(f"{where}.loss: expected one of {sorted(LOSSES)}, got {spec['loss']!r}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ValueError(f"{where}.weight: expected a number > 0, got {weight!r}")
    if "contrastive" not in {dataset_loss(spec, loss.name) for spec in train_specs.values()}:
        for name, value in (("false_negative_margin", loss.false_negative_margin), ("cross_device", loss.cross_device)):
            if value not in (None, False):  # (in a mixture, these act on its contrastive datasets)
                raise ValueError(f"loss.{name}: acts on the contrastive loss, and no training dataset uses it "
                                 f"(loss.name is {loss.name!r})")

    if cfg.data.streaming:
        for problem, why in ((train.max_steps is None, "needs train.max_steps (a stream's length is not known before "
                              "it is read)"),
                             (len(train_specs) > 1, "reads one dataset, and data.train is a mixture (its proportions "
                              "count each dataset's batches)"),
                             (loss.teacher.model is not None, "not with loss.teacher (the teacher's embeddings are "
                              "computed or read with the table, up front)")):
            if problem:
                raise ValueError(f"data.streaming: {why}")

    if speed.compile is not None:
        if speed.pad_to_multiple_of is None:
            raise ValueError("speed.compile: needs speed.pad_to_multiple_of (e.g. 16), so that batches come in a few "
                             "shapes; with a shape per text length every step would compile anew")
        if speed.compile == "reduce-overhead" and train.grad_accum > 1:
            raise ValueError("speed.compile: reduce-overhead (CUDA graphs) not with train.grad_accum > 1: a graph's "
                             "replay would overwrite the gradients accumulated from its earlier outputs")
        if train.cache_chunk_size is not None:
            raise ValueError("speed.compile: not with train.cache_chunk_size (GradCache replays dropout masks from "
                             "the RNG state, which compiled code draws from differently)")


def check_against_model(cfg: Config, model, device) -> None:
    """The checks that need the loaded model (an mrl Encoder) and the device: dims within its width, layers
    within its depth, the sequence length within its positions, a precision the device runs."""
    for name, dims in (("loss.dims", cfg.loss.dims), ("eval.dims", cfg.eval.dims)):
        if dims is not None:
            with naming(name):
                check_dims(dims, width=model.embedding_dim)
    for n_layers in cfg.eval.layers or []:
        if not 1 <= n_layers <= model.num_layers:
            raise ValueError(f"eval.layers: {n_layers} is not in 1..{model.num_layers} (the model's layers)")
    if cfg.loss.two_d.enabled:
        with naming("loss.two_d.layers_per_step"):
            check_layers_per_step(cfg.loss.two_d.layers_per_step, model.num_layers)
    limit = position_limit(model.backbone.config)
    if limit is not None and model.max_seq_length > limit:
        raise ValueError(f"model.max_seq_length: {model.max_seq_length} is more than the {limit} positions of "
                         f"{cfg.model.name}")
    if cfg.train.mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("train.mixed_precision: fp16 needs a GPU; on a CPU the run would train in float32 while "
                         "its config and results said fp16. Use bf16 or no")


def position_limit(config) -> int | None:
    """The longest input a transformers model takes, from its config: max_position_embeddings, less the two
    positions that RoBERTa-style models reserve (their positions start after the padding index)."""
    limit = getattr(config, "max_position_embeddings", None)
    offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer") else 0
    return None if limit is None else limit - offset


def named_specs(train: dict) -> dict[str, dict]:
    """data.train as {name: spec}: one plain spec is the mixture of one dataset, named 'train' (mrl/data/mixture.py).
    A mixture is a mapping whose every value is a spec (a mapping); anything else is one spec."""
    is_mixture = train and "path" not in train and all(isinstance(v, dict) for v in train.values())
    return dict(train) if is_mixture else {"train": train}


def dataset_field(name: str, specs: dict) -> str:
    """The field that names a training dataset in messages: data.train, or data.train.<name> in a mixture."""
    return f"data.train.{name}" if len(specs) > 1 else "data.train"


def dataset_loss(spec, default: str) -> str:
    """A training dataset's loss: its own `loss` key (a mixture's dataset), else loss.name (`default`)."""
    return spec.get("loss", default) if isinstance(spec, dict) else default


def dataset_losses(cfg: "Config") -> list[str]:
    """Each training dataset's loss, in data.train's order (one dataset: [loss.name] unless its spec names one)."""
    return [dataset_loss(spec, cfg.loss.name) for spec in named_specs(cfg.data.train).values()]


def uses_no_duplicates(cfg: Config, loss: str) -> bool:
    """data.no_duplicates, or by default on for the contrastive loss (a repeated text would be its own negative)."""
    return cfg.data.no_duplicates if cfg.data.no_duplicates is not None else loss == "contrastive"


def check_train_columns(cfg: Config, name: str, columns: list[str]) -> None:
    """The check that needs a training table (`name` in data.train's mixture): its text columns suit its loss
    and its prompts."""
    specs = named_specs(cfg.data.train)
    spec, where = specs[name], dataset_field(name, specs)
    try:
        check_columns(dataset_loss(spec, cfg.loss.name), len(columns))
    except ValueError as error:
        raise ValueError(f"{where}.columns: {error}; the table has {columns}") from None
    unknown = sorted(set(spec.get("prompts", cfg.data.prompts) or {}) - set(columns))
    if unknown:
        raise ValueError(f"{where}: prompts for no text column {unknown} of the table; it has {columns}")


def config_warnings(cfg: Config) -> list[str]:
    """What the config allows but trains nothing or little: all dim weights 0."""
    weights = cfg.loss.dim_weights
    if cfg.loss.matryoshka and isinstance(weights, list) and not any(weights):
        return ["loss.dim_weights: every weight is 0, so the loss is 0 and nothing trains"]
    return []
