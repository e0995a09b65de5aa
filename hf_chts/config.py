"""``SparsifyConfig``: what to sparsify and how the topology evolves.

A method preset (``"chtss"``, ``"chts"``, ``"cht"``, ``"set"``, ``"rigl"``,
``"gmp"``, ``"dense"``) fills every field left at ``None`` with the values of
docs/algorithms.md §7; fields given explicitly override the preset. The config is
validated on construction and round-trips through JSON; like a PEFT config it has
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (:mod:`hf_chts.hub`, docs/hub.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .hub import ConfigHubMixin
from .topology.budgets import BUDGET_ROUNDINGS
from .topology.init import BRF_CENTRES, DEGREE_MODES, INIT_METHODS
from .topology.regrowth import REGROWTH_METHODS, SELECTIONS

# The choices of the fields below that are implemented here (the engine and the schedules);
# the others are defined next to their implementation and imported.
REMOVALS = ("soft", "rigid", "none")
REGROWTHS = (*REGROWTH_METHODS, "none")  # "none": no regrowth (the engine skips it)
SCHEDULES = ("sigmoid", "cubic", "constant")
ZETA_SCHEDULES = ("cosine", "constant")
TEMPERATURE_SCHEDULES = ("t_linear", "delta_linear")
LR_REWARMUP_MODES = ("after_update", "every_cycle")

# docs/algorithms.md §7: methods as configurations. Values applied to fields left None.
PRESETS: dict[str, dict[str, Any]] = {
    "chtss": dict(
        initial_density=1.0, init="brf", removal="soft", removal_alpha=1.0, prune_alpha=0.0, regrowth="ch2_l3n",
        regrowth_selection="soft", schedule="sigmoid", percolation=True,
    ),
    "chts": dict(
        init="brf", removal="soft", removal_alpha=1.0, regrowth="ch2_l3n", regrowth_selection="soft",
        schedule="constant", percolation=True,
    ),
    "cht": dict(
        init="bsw", removal="rigid", removal_alpha=1.0, regrowth="ch3_l3", regrowth_selection="rigid",
        schedule="constant", percolation=True,
    ),
    "set": dict(init="er", removal="rigid", removal_alpha=1.0, regrowth="random", schedule="constant", percolation=False),
    "rigl": dict(init="er", removal="rigid", removal_alpha=1.0, regrowth="gradient", schedule="constant", percolation=False),
    "gmp": dict(
        initial_density=1.0, init="dense", removal="none", prune_alpha=1.0, regrowth="none", schedule="cubic",
        percolation=False,
    ),
    "dense": dict(
        target_density=1.0, initial_density=1.0, init="dense", removal="none", regrowth="none", schedule="constant",
        percolation=False,
    ),
}
METHODS = tuple(PRESETS)  # the method presets: "chtss", "chts", "cht", "set", "rigl", "gmp", "dense"

# Fallbacks for fields no preset sets.
DEFAULTS: dict[str, Any] = dict(
    init="brf", removal="soft", removal_alpha=1.0, prune_alpha=0.0, regrowth="ch2_l3n", regrowth_selection="soft",
    schedule="constant", percolation=True,
)


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SparsifyConfig.{field_name}={value!r} is invalid: {allowed}.")


#: Float fields where ``math.inf`` has a documented meaning (soft regrowth at T = ∞ is top-k); NaN never does.
INFINITY_ALLOWED = ("regrowth_temperature",)
#: ``torch.Generator.manual_seed`` accepts seeds in [0, 2**64).
SEED_LIMIT = 2**64


def _check_finite_floats(config: "SparsifyConfig") -> None:
    """Every float field is finite (NaN and ±inf refused; +inf only where :data:`INFINITY_ALLOWED`)."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if item.name in INFINITY_ALLOWED and value == math.inf:
            continue
        allowed = ("a number or math.inf (top-k); NaN is not valid" if item.name in INFINITY_ALLOWED
                   else "a finite number; NaN and infinity are not valid")
        _fail(item.name, value, f"expected {allowed}")


@dataclass
class SparsifyConfig(ConfigHubMixin):
    """Configuration of sparse training with the Cannistraci-Hebb rules.

    ``config.save_pretrained(folder)`` writes ``folder/sparsify_config.json``;
    ``SparsifyConfig.from_pretrained(folder_or_repo_id, revision=..., token=...)``
    reads it (or the config of a sparse checkpoint); ``config.push_to_hub(repo_id)``
    uploads it (docs/hub.md).

    Args:
        method: preset filling the defaults of docs/algorithms.md §7: ``"chtss"``
            (sigmoid density decay, soft removal, CH2-L3n soft regrowth),
            ``"chts"``, ``"cht"``, ``"set"``, ``"rigl"``, ``"gmp"`` or ``"dense"``.
        target_density: fraction of live links per sparsified layer at the end, in (0, 1].
        initial_density: density at the start (``None``: the preset's; CHTss starts
            dense at 1.0, constant-density methods at ``target_density``).
        init: initial topology when starting below density 1 (docs/algorithms.md §2): ``er``, ``bsw``,
            ``brf``, ``bsf``, ``csti`` or ``dense``.
        init_beta: rewiring probability of ``bsw`` in [0, 1].
        init_r: receptive-field radius of ``brf`` in [0, 1].
        init_degree_mode: ``brf`` degree distribution, ``"uniform"`` or ``"fixed"``.
        brf_centres: where ``brf`` centres row ``i`` of a rectangular layer: ``"diagonal"``
            (``i·max/min``) or ``"integer_stride"`` (``i·⌊max/min⌋ mod max``, released).
            ``None``: ``"integer_stride"`` with ``parity``.
        bsf_equal_partition: ``bsf`` option (every node of the first side linked).
        bsf_resort: ``bsf`` option: permute the hidden neurons of each MLP chain so that
            in-degree and out-degree ranks agree (hubs feed hubs; CHTs paper §3.1.1).
        reinit_weights: re-initialise live weights for their sparse fan-in (paper option).
        removal: ``"soft"`` (sampled ∝ importance^T), ``"rigid"`` (top-k) or ``"none"``.
        removal_alpha: α of docs/algorithms.md §3.1, blending relative importance (0) and magnitude (1).
        removal_delta_start / removal_delta_end: δ range of the removal temperature
            ``T = δ/(1−δ)`` over the update window (docs/algorithms.md §6.3).
        removal_temperature_schedule: ``"t_linear"`` (default: T rises linearly from
            T(δ_start) to T(δ_end), as the released code does) or ``"delta_linear"``
            (δ rises linearly and ``T = δ/(1−δ)``, the paper's wording); see docs/parity.md.
        prune_alpha: α of the importance used to prune to the scheduled density
            (CHTss: 0 = relative importance).
        regrowth: ``"ch2_l3n"``, ``"ch3_l3n"``, ``"ch3_l3"`` (path-based CHT),
            ``"random"`` (SET), ``"gradient"`` (RigL) or ``"none"``.
        regrowth_selection: ``"soft"`` (sample ∝ score^T) or ``"rigid"`` (top-k).
        regrowth_temperature: T of soft regrowth (default 1).
        update_interval: Δ, optimizer steps between topology updates.
        removal_fraction: ζ, fraction of live links removed (and regrown) per update.
        removal_fraction_schedule: ``"cosine"`` (ζ_t decays to 0 at the update end) or ``"constant"``.
        update_end_fraction: topology updates happen while ``t ≤ update_end_fraction·total_steps``.
        schedule: density schedule, ``"sigmoid"`` (CHTss), ``"cubic"`` (GMP) or ``"constant"``.
        sigmoid_k: steepness k of the sigmoid decay (6).
        decay_start_fraction / decay_end_fraction: decay window as fractions of the
            total steps (``None`` end: the update end). The final density is reached
            exactly at the last update inside the window.
        percolation: remove links of inactive neurons after removal (docs/algorithms.md §4).
        rope_aware: treat RoPE-mixed q/k dims as one unit in percolation (docs/algorithms.md §4).
        parity: reproduce the authors' released LLaMA recipe where it differs from the
            paper (every difference is a field below and is listed in docs/parity.md):
            δ end 0.9 (T 1→9), no percolation (RoPE-unaware if switched on), rigid
            regrowth, skipped optimizer step on update steps, LR re-warm-up of 10 steps
            every cycle for the whole run, link budgets rounded down, BRF centred with
            the integer stride. Fields given explicitly still win.
        skip_optimizer_step_on_update: parity option (docs/algorithms.md §6.5).
        lr_rewarmup_steps: re-warm-up length ``w`` in optimizer steps; 0 disables
            (``None``: 10 with ``parity``, else 0).
        lr_rewarmup_mode: ``"after_update"`` (the ``j``-th step after each topology
            update inside the update window runs at ``min(1, j/w)``) or ``"every_cycle"``
            (released: the LR factor is ``min(1, (c mod Δ)/w)`` at every scheduler step
            ``c`` of the whole run). ``None``: ``"every_cycle"`` with ``parity``.
        budget_rounding: links a layer holds at density ρ after an update:
            ``"nearest"`` (``round(ρ·N)``) or ``"floor"`` (``⌊ρ·N⌋``, released; a
            constant-density layer is then not pruned, it regrows fewer links).
            ``None``: ``"floor"`` with ``parity``.
        target_modules: module names, suffixes or a regex (PEFT conventions); ``None``
            = every linear of the decoder blocks for the architecture.
        exclude_modules: names, suffixes or a regex never sparsified.
        seed: seed of every random choice (same on every rank).
        ch_memory_budget_mb: dense-temporary budget above which CH scores are chunked.
    """

    method: str = "chtss"
    target_density: float = 0.3
    initial_density: float | None = None
    init: str | None = None
    init_beta: float = 0.25
    init_r: float = 0.25
    init_degree_mode: str = "uniform"
    brf_centres: str | None = None
    bsf_equal_partition: bool = False
    bsf_resort: bool = False
    reinit_weights: bool = False
    removal: str | None = None
    removal_alpha: float | None = None
    removal_delta_start: float = 0.5
    removal_delta_end: float | None = None
    removal_temperature_schedule: str = "t_linear"
    prune_alpha: float | None = None
    regrowth: str | None = None
    regrowth_selection: str | None = None
    regrowth_temperature: float = 1.0
    update_interval: int = 100
    removal_fraction: float = 0.1
    removal_fraction_schedule: str = "cosine"
    update_end_fraction: float = 0.75
    schedule: str | None = None
    sigmoid_k: float = 6.0
    decay_start_fraction: float = 0.0
    decay_end_fraction: float | None = None
    percolation: bool | None = None
    rope_aware: bool | None = None
    parity: bool = False
    skip_optimizer_step_on_update: bool | None = None
    lr_rewarmup_steps: int | None = None
    lr_rewarmup_mode: str | None = None
    budget_rounding: str | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    seed: int = 0
    ch_memory_budget_mb: int = 1024
    config_file_name = "sparsify_config.json"  # a class attribute (no annotation): not a field
    # fields the user set explicitly (filled by __post_init__); not part of the public surface
    _explicit: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method.lower() not in METHODS:
            _fail("method", self.method, f"expected one of {', '.join(METHODS)}")
        self.method = self.method.lower()
        explicit = tuple(
            f.name for f in dataclasses.fields(self) if not f.name.startswith("_") and getattr(self, f.name) is not None
        )
        preset = PRESETS[self.method]
        if self.parity and self.percolation is None:
            self.percolation = False  # the released recipe never passes --chain_removal (docs/parity.md)
        for name, value in {**DEFAULTS, **preset}.items():
            if name in ("target_density", "initial_density") and name in preset:
                if self.method == "dense":
                    setattr(self, name, value)
                continue
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.method != "dense" and self.initial_density is None:
            self.initial_density = preset.get("initial_density", self.target_density)
        if self.removal_delta_end is None:
            self.removal_delta_end = 0.9 if self.parity else 0.75
        if self.rope_aware is None:
            self.rope_aware = not self.parity
        if self.skip_optimizer_step_on_update is None:
            self.skip_optimizer_step_on_update = self.parity
        if self.parity and "regrowth_selection" not in explicit:
            self.regrowth_selection = "rigid"
        if self.lr_rewarmup_steps is None:
            self.lr_rewarmup_steps = 10 if self.parity else 0
        if self.lr_rewarmup_mode is None:
            self.lr_rewarmup_mode = "every_cycle" if self.parity else "after_update"
        if self.budget_rounding is None:
            self.budget_rounding = "floor" if self.parity else "nearest"
        if self.brf_centres is None:
            self.brf_centres = "integer_stride" if self.parity else "diagonal"
        if self.decay_end_fraction is None:
            self.decay_end_fraction = self.update_end_fraction
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        self._explicit = explicit
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, the value and what is allowed."""
        _check_finite_floats(self)

        def density(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
                _fail(name, value, "expected a density in (0, 1]")

        def unit(name: str, closed_high: bool = True) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and 0.0 <= value and (value <= 1.0 if closed_high else value < 1.0)
            if not ok:
                _fail(name, value, f"expected a number in [0, 1{']' if closed_high else ')'}")

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"expected one of {', '.join(allowed)}")

        def boolean(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "expected True or False")

        density("target_density")
        density("initial_density")
        if self.initial_density < self.target_density:
            _fail("initial_density", self.initial_density,
                  f"expected initial_density >= target_density ({self.target_density}); densities only decrease")
        if self.schedule == "constant" and not math.isclose(self.initial_density, self.target_density):
            _fail("initial_density", self.initial_density,
                  f"schedule 'constant' (method {self.method!r}) keeps the density fixed: set initial_density equal "
                  f"to target_density ({self.target_density}) or use schedule='sigmoid'/'cubic'")
        choice("init", INIT_METHODS)
        unit("init_beta")
        unit("init_r")
        choice("init_degree_mode", DEGREE_MODES)
        choice("brf_centres", BRF_CENTRES)
        choice("removal", REMOVALS)
        unit("removal_alpha")
        unit("prune_alpha")
        unit("removal_delta_start", closed_high=True)
        unit("removal_delta_end", closed_high=True)
        if self.removal_delta_end < self.removal_delta_start:
            _fail("removal_delta_end", self.removal_delta_end,
                  f"expected >= removal_delta_start ({self.removal_delta_start})")
        choice("removal_temperature_schedule", TEMPERATURE_SCHEDULES)
        choice("regrowth", REGROWTHS)
        choice("regrowth_selection", SELECTIONS)
        if (isinstance(self.regrowth_temperature, bool) or not isinstance(self.regrowth_temperature, (int, float))
                or self.regrowth_temperature < 0):
            _fail("regrowth_temperature", self.regrowth_temperature, "expected a number >= 0 (math.inf = top-k)")
        if isinstance(self.update_interval, bool) or not isinstance(self.update_interval, int) or self.update_interval < 1:
            _fail("update_interval", self.update_interval, "expected a positive integer number of optimizer steps")
        unit("removal_fraction", closed_high=False)
        choice("removal_fraction_schedule", ZETA_SCHEDULES)
        unit("update_end_fraction")
        choice("schedule", SCHEDULES)
        if not isinstance(self.sigmoid_k, (int, float)) or self.sigmoid_k <= 0:
            _fail("sigmoid_k", self.sigmoid_k, "expected a number > 0")
        unit("decay_start_fraction")
        unit("decay_end_fraction")
        if self.decay_end_fraction <= self.decay_start_fraction and self.schedule != "constant":
            _fail("decay_end_fraction", self.decay_end_fraction,
                  f"expected > decay_start_fraction ({self.decay_start_fraction})")
        if (self.decay_end_fraction > self.update_end_fraction + 1e-12 and self.schedule != "constant"
                and not self.parity):
            _fail("decay_end_fraction", self.decay_end_fraction,
                  f"the decay window must end no later than update_end_fraction ({self.update_end_fraction}) "
                  "so the final density is exactly the target (parity=True allows it, as the released recipe "
                  "does: its density then stops short of the target)")
        for name in ("bsf_equal_partition", "bsf_resort", "reinit_weights", "percolation", "rope_aware", "parity",
                     "skip_optimizer_step_on_update"):
            boolean(name)
        if isinstance(self.lr_rewarmup_steps, bool) or not isinstance(self.lr_rewarmup_steps, int) or self.lr_rewarmup_steps < 0:
            _fail("lr_rewarmup_steps", self.lr_rewarmup_steps, "expected an integer >= 0 (0 disables)")
        choice("lr_rewarmup_mode", LR_REWARMUP_MODES)
        choice("budget_rounding", BUDGET_ROUNDINGS)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except (re.error, RecursionError, OverflowError) as error:
                    _fail(name, value, f"not a valid regular expression ({error})")
                continue
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                _fail(name, value, "expected None, a regex string, or a list of module names/suffixes")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            _fail("seed", self.seed, "expected an integer in [0, 2**64) (the range of torch.Generator seeds)")
        if isinstance(self.ch_memory_budget_mb, bool) or not isinstance(self.ch_memory_budget_mb, int) or self.ch_memory_budget_mb < 1:
            _fail("ch_memory_budget_mb", self.ch_memory_budget_mb, "expected a positive integer (MiB)")
        if self.init == "dense" and self.initial_density < 1.0:
            _fail("init", self.init, f"init 'dense' builds a full mask but initial_density is {self.initial_density}; "
                  "choose a sparse init (er, bsw, brf, bsf, csti) or initial_density=1.0")
        if self.removal != "none" and self.regrowth == "none":
            _fail("regrowth", self.regrowth, f"removal '{self.removal}' without regrowth would let the density fall "
                  "below the schedule at every update; set a regrowth method or removal='none'")
        if self.init == "csti" and self.initial_density >= 1.0:
            _fail("init", self.init, "csti builds a sparse start; it needs initial_density < 1")

    # --------------------------------------------------------------- helpers
    @property
    def is_dense(self) -> bool:
        """True when nothing is ever sparsified (method 'dense' or density 1 throughout)."""
        return self.target_density >= 1.0 and self.initial_density >= 1.0

    @property
    def removal_temperature_range(self) -> tuple[float, float]:
        """(T_start, T_end) from the δ range, ``T = δ/(1−δ)`` (docs/algorithms.md §3.1)."""
        from .topology.removal import delta_to_temperature

        return delta_to_temperature(self.removal_delta_start), delta_to_temperature(self.removal_delta_end)

    # ------------------------------------------------------------ JSON I/O
    def to_dict(self) -> dict[str, Any]:
        """All resolved fields as plain JSON-able values."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        for key, value in data.items():
            if isinstance(value, float) and math.isinf(value):
                data[key] = "inf"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsifyConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"SparsifyConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(data) - known)
        if unknown:
            from .suggest import did_you_mean

            hints = [f"{k!r}{did_you_mean(k, known)}" for k in unknown]
            raise ValueError(f"unknown SparsifyConfig field(s): {', '.join(hints)}")
        values = {k: (math.inf if v == "inf" else v) for k, v in data.items()}
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON to the file ``path`` (atomically).

        Kept for compatibility: prefer :meth:`save_pretrained`, which takes a folder.
        """
        from .io_utils import atomic_write_text

        atomic_write_text(path, self.to_json_string() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparsifyConfig":
        """Read the config file ``path`` (an alias of :meth:`from_file`; prefer :meth:`from_pretrained`)."""
        return cls.from_file(path)


def _refuse_unknown_fields(init):
    """Wrap the dataclass ``__init__`` so that a mistyped keyword names the closest field
    (``SparsifyConfig(update_intervall=5)`` -> ``... (did you mean 'update_interval'?)``)."""

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        known = [f.name for f in dataclasses.fields(type(self)) if not f.name.startswith("_")]
        unknown = [key for key in kwargs if key not in known]
        if unknown:
            from .suggest import did_you_mean

            hints = ", ".join(f"{key!r}{did_you_mean(key, known)}" for key in unknown)
            raise TypeError(f"SparsifyConfig got unknown field(s) {hints}; the fields are listed in "
                            "help(hf_chts.SparsifyConfig)")
        init(self, *args, **kwargs)

    return checked_init


SparsifyConfig.__init__ = _refuse_unknown_fields(SparsifyConfig.__init__)
