"""``EditConfig``: every knob of the Transformer-Patcher editor, with three named configurations.

- ``EditConfig()`` (mode ``default``): patches start solved (a separating key, a bias that silences the memory, values
  that fix the edit) and training stops as soon as the edit holds with a margin and every memory constraint is met;
  hopeless edits are given up early and their patches dropped. What measures best (docs/performance.md).
- ``EditConfig.faithful()``: the official code's algorithm, schedule and values (random values, training to the
  validation plateau, failed patches kept).
- ``EditConfig.quick()``: the faithful algorithm checked every 5 steps instead of from step 125 every 25.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformer_patcher.core.validation import check_bool, check_int, check_number
from transformer_patcher.tuners.patcher.config import PatcherConfig

# Memory-loss margins (beta, gamma) per activation family. GELU and ReLU are the official values. For SiLU (the
# LLaMA family) beta is where SiLU is as close to zero as GELU is at -3 (|GELU(-3)| = 0.0040 = |SiLU(-7.5)|), so a
# memory query below beta leaks as little output as in the paper; gamma keeps the official gap size (3).
MARGINS: dict[str, tuple[float, float]] = {"gelu": (-3.0, 3.0), "relu": (0.0, 0.0), "silu": (-7.5, 3.0)}

# Activation-loss margin m_a (the edit should fire above it) per family. GELU/ReLU: the official 0. SiLU: on SmolLM2 +
# zsRE a trained edit fires at 2-5 while its rephrases sit about 4 lower, near 0 where SiLU is silent, and memory sits
# 12-14 below the edit, far more than the margins ask. Asking the edit to fire above 15 lifts rephrases into SiLU's
# linear range: GR 0.3 -> 0.8 on 10 edits, SR/ER/locality unchanged (the sweep is in docs/results.md).
ACTIVATION_MARGINS: dict[str, float] = {"gelu": 0.0, "relu": 0.0, "silu": 15.0}

# A new patch set's neuron activation per task kind ("ffn": the FFN's own, the paper's). ReLU6 is a gate for
# generators: exactly 0 below its threshold, the whole fix above half the edit's pre-activation (GR 0.41 -> 0.58 with
# better locality on 100 SmolLM2 zsRE dev edits). A classifier keeps its FFN's: over FEVER's 947-edit stream, ReLU6
# patches left TestR at 0.961, GELU ones at 1.004 (docs/results.md).
FFN_ACTIVATION = "ffn"
PATCH_ACTIVATION = {"classification": FFN_ACTIVATION, "seq2seq": FFN_ACTIVATION, "causal_lm": "relu6"}

# Loss weight of the memory term per task, as hard-coded in the official scripts/main.py.
MEMORY_LOSS_WEIGHT = {"classification": 5.0, "seq2seq": 10.0, "causal_lm": 10.0}


_POSITIVE_INTS = ("repeats", "max_steps", "check_every", "lr_every", "act_top_k", "memory_top_k")
_NON_NEGATIVE_INTS = (
    "start_val_step",
    "early_patience",
    "lr_patience",
    "token_contexts",
    "nearest_contrasts",
    "key_views",
    "subject_key",
)
_POSITIVE_FLOATS = ("lr", "grad_clip", "lr_factor")
_NON_NEGATIVE_FLOATS = ("weight_decay", "early_threshold", "lr_threshold", "act_loss_weight", "memory_loss_weight")
_FINITE_FLOATS = ("act_margin", "memory_beta", "memory_gamma")
_NEW_FLOATS = (
    "edit_margin",
    "solve_margin",
    "key_gap",
    "whiten_ridge",
    "answer_gate",
    "contrast_spread",
    "view_scatter",
    "weak_lead",
    "gated_answer_gate",
)
INITS = ("paper", "solve")
STOPS = ("plateau", "constraints")
MODES = ("default", "faithful", "quick")
# Where a causal LM's subject gate reads, as a fraction of the depth: block 4 of SmolLM2's 30 (round(0.15 * 29)), where
# the zsRE dev stream's GR rose 0.535 -> 0.61 and every locality part reached 0.99-1.00 (docs/editing.md, rule 12).
# On Gemma-3-270M (block 3 of 18) it holds too, once it compares in its frame (gate_frame; docs/editing.md, rule 12).
GATE_DEPTH = 0.15
MAX_KEY_VIEWS = 16  # the openings the model writes its prefixes from (methods/patcher/views.py)
MAX_SEED = 2**32  # the per-edit seed is seed * 1_000_003 + edit_id, which torch.manual_seed must accept


def activation_family(activation: str) -> str:
    """Map a transformers activation name (``gelu_new``, ``gelu_pytorch_tanh``, ``swish``, …) to a margin family."""
    name = activation.lower()
    for family, aliases in (("gelu", ("gelu",)), ("relu", ("relu",)), ("silu", ("silu", "swish"))):
        if any(alias in name for alias in aliases):
            return family
    raise ValueError(
        f"no default memory margins for activation {activation!r}; set EditConfig(memory_beta=..., memory_gamma=...)"
    )


@dataclass
class EditConfig:
    """Hyper-parameters of one edit. Field defaults are mode ``default``; :meth:`faithful` gives the official code's
    values (docs/editing.md lists where each mode differs from the paper)."""

    lr: float = 1e-2
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    repeats: int = 8  # the edit example is repeated this many times per batch
    dropout: bool = False  # train the copies with dropout (augmentation); off: copies are identical
    max_steps: int = 100  # faithful: 2000
    start_val_step: int = 100  # fixed/plateau checks run after steps > start_val_step that are multiples of ...
    check_every: int = 25  # ... check_every (official: validation every 25 epochs once epoch >= 100)
    use_validation: bool = True  # official use_val=1: once fixed, stop at the validation memory-loss plateau
    early_patience: int = 1
    early_threshold: float = 1e-3
    lr_factor: float = 0.5  # ReduceLROnPlateau on the validation edit loss every lr_every steps
    lr_every: int = 25
    lr_patience: int = 1
    lr_threshold: float = 0.05
    act_top_k: int = 5
    act_margin: float | None = None  # None: ACTIVATION_MARGINS by the patch activation (official: 0)
    memory_top_k: int = 1000
    memory_beta: float | None = None  # None: from MARGINS by the patch activation
    memory_gamma: float | None = None
    act_loss_weight: float = 1.0
    memory_loss_weight: float | None = None  # None: MEMORY_LOSS_WEIGHT of the task kind
    max_patches: int | None = None  # one patch per wrong read, at most this many per edit (None: no cap)
    value_init: str = "normal"  # init="paper": v' ~ N(0, 1) (official); the paper's text says uniform [0, 1)
    cache: bool = True  # last-layer caching; False recomputes the full forward pass every step
    keep_failed: bool = False  # keep the patches of an edit that failed (the official code does)
    init: str = "solve"  # "paper": k = q/‖q‖², b = 0, random v; "solve": separating key and bias, solved values
    stop: str = "constraints"  # "plateau": official checks; "constraints": stop once the edit and memory hold
    edit_margin: float = 1.0  # stop="constraints": every read's target logit leads the runner-up by this much
    solve_margin: float = 14.0  # init="solve": the values give every patched read this logit lead
    key_gap: float = 12.0  # init="solve": the edit's pre-activation starts this far above the activation margin
    whiten_ridge: float = 0.1  # init="solve": ridge of the memory covariance the key whitens with
    whiten_edit_rows: bool = False  # init="solve": the edits' memory rows count in that covariance too (False: only
    # the built memory's rows, which stand for what the deployed model reads; the edits' question reads do not)
    give_up_after: int | None = 25  # give a hopeless edit up after this many steps without a 1 % better loss
    patch_activation: str | None = None  # a new patch set's neurons: None by task kind, "ffn" the FFN's own (paper)
    weak_lead: float = 2.0  # init="solve": a read the edit gets right by less than this logit lead gets a patch too
    answer_gate: float = 0.5  # init="solve": a patch on a later answer token fires only this far from memory to edit
    contrast_spread: float = 0.5  # init="solve": thresholds sit this many standard deviations above the top contrast
    token_contexts: int = 16  # init="solve", causal LMs: running-text contexts of its token a later patch stays below
    nearest_contrasts: int = 0  # init="solve": of the contrasts, how many ask the subjects nearest the edit's own
    key_views: int = 16  # init="solve", causal LMs: self-written prefixes the first answer token's key is read behind
    view_scatter: float = 1.0  # init="solve": weight of the views' scatter against the memory covariance
    gate_layer: int | None = None  # causal LMs: a new patch set's subject gate reads this block (None: gate_depth)
    gate_depth: float | None = GATE_DEPTH  # ... else the block this far down (None with gate_layer None: no gate)
    gate_threshold: float = 0.8  # the cosine at which a patch's subject gate opens
    gated_contrasts: bool = False  # init="solve": a gated patch's threshold also rises above other subjects' contrasts
    gated_contexts: bool = False  # init="solve": a gated patch's later answer tokens also rise above running text
    gated_answer_gate: float = 0.0  # init="solve": answer_gate for a gated patch's later answer tokens
    gated_views: bool = True  # key_views: a gated patch's later answer tokens are keyed over the views too
    gate_frame: bool = True  # a new gate compares in a frame read from the memory texts (False: plain cosines)
    gated_edit_rows: bool = True  # a gated patch stays below only the earlier edits' memory rows its gate opens on
    # (False: below every earlier edit's rows, as below the rest of the memory)
    bare_subject: bool = True  # a gated patch's gate also opens on its subject named alone at a text's start
    subject_first_views: bool = True  # key_views: the first answer token's views also reword the edit subject first
    relation_views: bool = True  # key_views: the views also word the edit's relation as a training set does (rule 20)
    subject_key: int = 0  # init="solve": a gated first answer token's key tells the edit from this many other
    # questions about its subject, which set its threshold; the memory (other subjects, kept out by the gate) does not
    seed: int = 42
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse values training cannot use, naming the field: NaN/inf, wrong types, out-of-range numbers."""
        for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
            check_int(f"EditConfig.{name}", getattr(self, name), minimum=1 if name in _POSITIVE_INTS else 0)
        check_int("EditConfig.seed", self.seed, minimum=0, maximum=MAX_SEED - 1)
        optional = ("act_margin", "memory_beta", "memory_gamma", "memory_loss_weight")
        for name in _POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS + _FINITE_FLOATS:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            minimum = None if name in _FINITE_FLOATS else 0.0
            check_number(f"EditConfig.{name}", value, minimum, strict=name in _POSITIVE_FLOATS)
        if not 0 < self.lr_factor < 1:
            raise ValueError(
                f"EditConfig.lr_factor must be in (0, 1) (the learning rate is multiplied by it), got {self.lr_factor}"
            )
        for name in _NEW_FLOATS:
            check_number(f"EditConfig.{name}", getattr(self, name), 0.0, strict=name == "whiten_ridge")
        if self.key_views > MAX_KEY_VIEWS:
            raise ValueError(f"EditConfig.key_views must be at most {MAX_KEY_VIEWS}, got {self.key_views}")
        for name in ("answer_gate", "gated_answer_gate"):
            if getattr(self, name) >= 1:
                raise ValueError(f"EditConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("max_patches", "give_up_after"):
            if getattr(self, name) is not None:
                check_int(f"EditConfig.{name}", getattr(self, name), minimum=1)
        for name in (
            "dropout",
            "use_validation",
            "cache",
            "keep_failed",
            "gated_contrasts",
            "gated_contexts",
            "gated_views",
            "gate_frame",
            "gated_edit_rows",
            "bare_subject",
            "subject_first_views",
            "relation_views",
            "whiten_edit_rows",
        ):
            check_bool(f"EditConfig.{name}", getattr(self, name))
        if self.value_init not in ("normal", "uniform"):
            raise ValueError(f"value_init must be 'normal' or 'uniform', got {self.value_init!r}")
        for name, allowed in (("init", INITS), ("stop", STOPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"EditConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (self.init == "solve") != (self.stop == "constraints"):
            raise ValueError("init='solve' goes with stop='constraints' and init='paper' with stop='plateau'")
        if self.stop == "constraints" and self.dropout:
            raise ValueError("stop='constraints' reads its check off the training pass, which needs dropout=False")
        if self.gate_layer is not None:
            check_int("EditConfig.gate_layer", self.gate_layer)
        if self.gate_depth is not None:
            check_number("EditConfig.gate_depth", self.gate_depth, 0.0)
            if self.gate_depth > 1:
                raise ValueError(f"EditConfig.gate_depth is a fraction of the depth, at most 1, got {self.gate_depth}")
        check_number("EditConfig.gate_threshold", self.gate_threshold, 0.0, strict=True)
        if self.gate_threshold > 1:
            raise ValueError(f"EditConfig.gate_threshold is a cosine and must be at most 1, got {self.gate_threshold}")
        if self.patch_activation not in (None, FFN_ACTIVATION):
            activation_family(self.patch_activation)  # an activation with known margins, else a clear error
        if not isinstance(self.extra, dict):
            raise ValueError(f"EditConfig.extra must be a dict, got {self.extra!r}")

    @classmethod
    def faithful(cls, **overrides: Any) -> EditConfig:
        """The official code's algorithm and values: the paper's key init with random values, training until the
        validation memory loss plateaus on the official check schedule, at most 5 patches, failed patches kept."""
        official = {
            "max_steps": 2000,
            "max_patches": 5,
            "keep_failed": True,
            "init": "paper",
            "stop": "plateau",
            "give_up_after": None,
            "patch_activation": FFN_ACTIVATION,
            "gate_depth": None,
            "key_views": 0,
        }
        return cls(**{**official, **overrides})

    @classmethod
    def mode(cls, name: str, **overrides: Any) -> EditConfig:
        """The named configuration ``default``, ``faithful`` or ``quick`` (``official`` is faithful's old name)."""
        name = "faithful" if name == "official" else name
        if name not in MODES:
            raise ValueError(f"unknown editing mode {name!r}; choose one of {MODES}")
        return cls(**overrides) if name == "default" else getattr(cls, name)(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> EditConfig:
        """The faithful algorithm with a denser stopping schedule: checks from step 5, every 5 steps.

        The official schedule cannot stop before step 150 (first check after step 125, plateau at the next). On a CPU
        most edits are fixed and their memory loss flat long before that; checking every 5 steps stops them there.
        Everything else, including the plateau rule and the learning-rate schedule, is unchanged.
        """
        return cls.faithful(**{"start_val_step": 0, "check_every": 5, **overrides})

    def margins(self, activation: str) -> tuple[float, float]:
        """(beta, gamma) for the patch activation, explicit values winning over the family defaults."""
        if self.memory_beta is not None and self.memory_gamma is not None:
            return self.memory_beta, self.memory_gamma
        beta, gamma = MARGINS[activation_family(activation)]
        return (
            beta if self.memory_beta is None else self.memory_beta,
            gamma if self.memory_gamma is None else self.memory_gamma,
        )

    def activation_margin(self, activation: str) -> float:
        """m_a of the activation loss: the explicit value, else the family default."""
        return self.act_margin if self.act_margin is not None else ACTIVATION_MARGINS[activation_family(activation)]

    def patch_activation_for(self, task_kind: str) -> str | None:
        """The activation of a new patch set's neurons for a task kind (an ``ACT2FN`` name; None: the FFN's own)."""
        name = self.patch_activation or PATCH_ACTIVATION[task_kind]
        return None if name == FFN_ACTIVATION else name

    def adapter_config(self, task_kind: str, layer_index: int = -1) -> PatcherConfig:
        """A new patch set's adapter config for a task kind: its activation, and the subject gate for causal LMs
        (``gate_layer`` when set, else ``gate_depth``)."""
        gated = task_kind == "causal_lm"
        return PatcherConfig(
            patch_activation=self.patch_activation_for(task_kind),
            layer_index=layer_index,
            gate_layer=self.gate_layer if gated else None,
            gate_depth=self.gate_depth if gated and self.gate_layer is None else None,
            gate_threshold=self.gate_threshold,
        )

    def memory_weight(self, task_kind: str) -> float:
        return self.memory_loss_weight if self.memory_loss_weight is not None else MEMORY_LOSS_WEIGHT[task_kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EditConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)
