"""Recipe files: every stage and hyper-parameter of a training run in one versioned YAML file.

What. `TrainRecipe` is what ``visor-vllm train RECIPE.yaml`` (and ``accelerate launch -m
visor_vllm.training RECIPE.yaml``) runs: an initial checkpoint, training data, an output
directory and a list of `StageSpec` run in order, each starting from the previous one's output.

```yaml
recipe_version: 1
seed: 0
init: checkpoints/visor-converted     # a VISOR dir (stage1/stage2) or LLaVA-OV dir (dense)
data: {train: data/train.jsonl, image_folder: null, max_length: 2048}
output_dir: runs/visor
save_every: 200                       # optimizer steps between resumable states
log_every: 10
compile: false                        # true: torch.compile each transformer block (below)
stages:
  - {kind: stage1, steps: 400, lr: 1.0e-3, batch_size: 64, micro_batch_size: 64,
     configs: max}
  - {kind: stage2, steps: 2000, lr: 5.0e-4, batch_size: 64, configs: viable,
     sampling: sandwich}
```

Stage kinds (paper Sec. 4.2.3 / 5.1): ``dense`` trains transformers' LLaVA-OneVision (the
accuracy anchor); ``stage1`` trains only the new modules (cross-attention, conv, the routing
token's embedding row) on one configuration, or with ``train_language_model: true`` (not the
paper's) what stage 2 trains, on that one configuration; ``stage2`` trains the whole model
(vision tower if ``train_vision_tower``), one configuration per optimisation step drawn from
``configs``. Either VISOR stage may distil (not the paper's): ``distill: 1.0`` with
``teacher: PATH`` (the dense LLaVA-OV checkpoint VISOR was converted from: the teacher reads
VISOR's prompt without the routing token, which is its own prompt only for that one) adds
``distill`` x KL(teacher || VISOR) over the answer tokens to the loss; the teacher runs frozen
beside the student (one more forward a step, in memory on every process, never saved).

``configs``: ``max`` -- the maximal configuration, i.e. every SA-capable layer (see below);
``min``; ``viable`` -- every configuration in the checkpoint's ``sa_configs``; or an explicit
list of 0-based layer lists. ``sampling``: ``uniform`` (Once-for-All, the paper) or
``sandwich`` (max, min, then two uniform draws, repeating -- what the feasibility study used).

The maximal configuration. The paper pre-trains stage 1 with ``|L_SA| = L/3`` SA layers, then
keeps the viable subsets. A VISOR config can only run SA on SA-capable layers, and the
schedule makes a layer SA-capable exactly when some viable configuration uses it. So ``max``
is the union of the viable configurations: for ``visor-0.5b`` that is Appendix A's costliest,
1-based ``[1, 4, 7, 10, 16, 19, 22]`` (7 of the 8 grid slots: no configuration the paper kept
uses layer 13, so stage 1 does not train it either); for ``synthetic`` it is ``[0, 2, 4, 6]``,
for ``synthetic-5sa`` ``[0, 2, 3, 5, 6]``.

``compile: true`` compiles every transformer block of the model a stage trains (torchtitan's
per-block ``torch.compile``: `visor_vllm.training.engines.compile_blocks`) before the engine
wraps it: the same math with fused kernels, so losses agree with the eager step to float
rounding (~1e-7) and a long run's trajectory differs as it would on another machine.

Footguns. ``batch_size`` is the *global* batch (samples per optimizer step);
``micro_batch_size`` is per process and micro-step; gradient accumulation is derived
(``batch_size / (micro_batch_size * processes)``) and must be a whole number. Unknown keys are
errors (a typo must not silently fall back to a default). YAML 1.1, which PyYAML speaks,
reads ``lr: 1e-4`` (no dot) as the *string* "1e-4"; every recipe file and ``--set`` value is
read with `load_yaml`, which reads it as the number, as YAML 1.2 and every other reader do.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_VERSION = 1
KINDS = ("dense", "stage1", "stage2")


class RecipeError(ValueError):
    """A recipe file that is malformed or inconsistent."""


# YAML 1.2's floats (PyYAML's own pattern, with the exponent's dot and sign optional): 1e-4,
# 2E3 and 1.0e-3 are numbers. Integers resolve first ("2500" stays an int).
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                      |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                      |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                      |[-+]?\.(?:inf|Inf|INF)
                      |\.(?:nan|NaN|NAN))$""", re.X)


@functools.cache
def _loader():
    """PyYAML's SafeLoader with YAML 1.2's floats (built once)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def load_yaml(text: str):
    """``yaml.safe_load`` that reads ``1e-4`` as a float (YAML 1.1 makes it a string)."""
    import yaml

    return yaml.load(text, Loader=_loader())  # noqa: S506 -- a SafeLoader subclass


def is_number(x, integer: bool = False) -> bool:
    """``x`` is an int (or, unless ``integer``, a float) and not a bool (YAML's true is 1)."""
    return isinstance(x, int if integer else (int, float)) and not isinstance(x, bool)


@dataclass
class StageSpec:
    kind: str
    steps: int
    lr: float
    batch_size: int = 64
    micro_batch_size: int | None = None     # default: batch_size / processes
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0               # the paper: AdamW without weight decay
    configs: str | list = "max"
    sampling: str = "uniform"
    train_vision_tower: bool = False
    train_language_model: bool = False      # stage1 only: train the LLM too (not the paper's)
    gradient_checkpointing: bool = False
    distill: float = 0.0                    # VISOR stages: + distill * KL(teacher || VISOR) on
    teacher: str | None = None              # the answer tokens; the teacher: a dense LLaVA-OV
                                            # checkpoint (not the paper's)
    name: str | None = None                 # output subdirectory; default: kind

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RecipeError(f"stage kind {self.kind!r}; kinds: {list(KINDS)}")
        for name in ("steps", "batch_size", "lr", "warmup_ratio", "min_lr_ratio",
                     "max_grad_norm", "weight_decay", "distill"):
            value, whole = getattr(self, name), name in ("steps", "batch_size")
            if not is_number(value, integer=whole):
                kind = "an integer" if whole else "a number"
                raise RecipeError(f"stage {self.kind}: {name} is {kind}, got {value!r}")
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise RecipeError(f"stage {self.kind}: steps, lr and batch_size must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise RecipeError(f"stage {self.kind}: micro_batch_size must be positive")
        if self.sampling not in ("uniform", "sandwich"):
            raise RecipeError(f"stage {self.kind}: sampling is 'uniform' or 'sandwich'")
        if isinstance(self.configs, str) and self.configs not in ("max", "min", "viable"):
            raise RecipeError(f"stage {self.kind}: configs is max, min, viable or a list")
        if self.kind == "stage1" and self.configs not in ("max", "min") and not (
                isinstance(self.configs, list) and len(self.configs) == 1):
            raise RecipeError("stage1 trains one configuration (configs: max, or one list)")
        if self.train_language_model and self.kind != "stage1":
            raise RecipeError(f"stage {self.kind}: train_language_model is a stage1 option "
                              f"({self.kind} always trains the language model)")
        if self.distill < 0:
            raise RecipeError(f"stage {self.kind}: distill is a weight >= 0, got {self.distill}")
        if self.distill and self.kind == "dense":
            raise RecipeError("stage dense: distill is a VISOR stage option (the dense model is "
                              "the teacher)")
        if bool(self.distill) != (self.teacher is not None):
            raise RecipeError(f"stage {self.kind}: distill > 0 and teacher (a dense LLaVA-OV "
                              "checkpoint) go together")
        self.name = self.name or self.kind

    def accumulation(self, processes: int) -> tuple[int, int]:
        """``(micro_batch_size, gradient accumulation steps)`` for ``processes`` processes."""
        micro = self.micro_batch_size or max(self.batch_size // processes, 1)
        accum, rest = divmod(self.batch_size, micro * processes)
        if rest or accum < 1:
            raise RecipeError(
                f"stage {self.name}: batch_size {self.batch_size} is not a multiple of "
                f"micro_batch_size {micro} x {processes} process(es)")
        return micro, accum


@dataclass
class DataSpec:
    train: str
    image_folder: str | None = None
    max_length: int = 2048
    num_workers: int | None = None          # DataLoader workers preparing batches ahead;
                                            # None: 0 on a CPU where every sample is
                                            # pre-encoded, else 1 (trainer.loader_workers)
    pre_encode_gb: float = 4.0              # encode a stage's samples up front with the node's
                                            # CPUs, up to this many GB of tensors a process, the
                                            # rest as drawn (0: all as drawn; data.pre_encode)

    def __post_init__(self):
        w = self.num_workers
        if w is not None and (not is_number(w, integer=True) or w < 0):
            raise RecipeError(f"data.num_workers is a number of processes >= 0 or null, "
                              f"got {w!r}")
        gb = self.pre_encode_gb
        if not is_number(gb) or gb < 0:
            raise RecipeError(f"data.pre_encode_gb is a number of GB >= 0, got {gb!r}")


@dataclass
class TrainRecipe:
    init: str
    data: DataSpec
    output_dir: str
    stages: list[StageSpec]
    seed: int = 0
    save_every: int = 200
    log_every: int = 10
    recipe_version: int = RECIPE_VERSION
    mixed_precision: str = "no"            # no | bf16 (YAML's unquoted `no` is false: "no")
    compile: bool = False                  # torch.compile each block (engines.compile_blocks)
    extra: dict = field(default_factory=dict)  # free-form notes, copied into the outputs

    def __post_init__(self):
        if self.recipe_version != RECIPE_VERSION:
            raise RecipeError(f"recipe_version {self.recipe_version}; this build reads "
                              f"{RECIPE_VERSION}")
        if not self.stages:
            raise RecipeError("a recipe needs at least one stage")
        if self.mixed_precision is False:  # `mixed_precision: no` unquoted, as Accelerate writes it
            self.mixed_precision = "no"
        if not isinstance(self.compile, bool):
            raise RecipeError(f"compile is true or false, got {self.compile!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise RecipeError(f"mixed_precision is 'no' or 'bf16', got {self.mixed_precision!r}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"stage names must be unique, got {names}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainRecipe:
        d = dict(d)
        _no_unknown(d, cls, "recipe")
        try:
            data = d.pop("data")
            _no_unknown(data, DataSpec, "data")
            stages = [stage_from_dict(s) for s in d.pop("stages")]
            return cls(data=DataSpec(**data), stages=stages, **d)
        except (KeyError, TypeError) as e:
            raise RecipeError(f"recipe: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> TrainRecipe:
        import yaml

        p = Path(path)
        if not p.exists():
            raise RecipeError(f"recipe {p} does not exist")
        try:
            d = load_yaml(p.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {p}: {e}") from None
        if not isinstance(d, dict):
            raise RecipeError(f"recipe {p}: expected a mapping at the top level")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def stage_from_dict(d) -> StageSpec:
    """One stage of a recipe: a mapping with `StageSpec`'s keys, any other a `RecipeError`."""
    if not isinstance(d, dict):
        raise RecipeError(f"a stage is a mapping, got {d!r}")
    _no_unknown(d, StageSpec, "stage")
    return StageSpec(**d)


def _no_unknown(d: dict, cls, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise RecipeError(f"{what}: unknown key(s) {bad}; known: {sorted(known)}")
