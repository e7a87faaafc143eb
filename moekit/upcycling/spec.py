"""What an upcycling run makes: the experts, the method, the router and the scaling.

The scaling rules, with ``y = W_d (silu(W_g x) * W_u x)`` the dense MLP and routing
weights renormalised over the top-k experts (Mixtral always; Qwen-MoE with
``norm_topk_prob``, which moekit sets):

- ``copy``: every expert is ``y``, the weights sum to 1, so the MoE returns ``y`` for any
  router.
- ``granular``: the intermediate dimension is cut into G slices, ``y = sum_g y_g``; expert
  ``r*G + g`` holds slice ``g``. Router rows are equal inside each virtual group ``r``, so
  the G experts of a group get equal logits and top-k (a multiple of G) takes whole groups;
  the selected weights then sum to 1 over ``k/G`` groups, i.e. ``1/G`` per copy of ``y``.
  Multiplying only the down projection by G restores ``y`` exactly (down is linear;
  SiLU is not homogeneous, so Megatron-Core's cube-root scaling of all three projections
  keeps magnitudes but not the function).
- ``--shared-expert``: the shared expert is the dense MLP and the routed experts carry half
  of ``y``; a gated shared expert (Qwen2-MoE) gets a zero gate, ``sigmoid(0) = 1/2``, so
  both halves are exact powers of two.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import MoekitError
from ..layouts.families import MAX_EXPERTS

Method = Literal["copy", "granular", "drop"]
RouterInit = Literal["zero", "random", "virtual-group"]
Scaling = Literal["exact", "megatron"]

METHODS: tuple[str, ...] = ("copy", "granular", "drop")
ROUTERS: tuple[str, ...] = ("zero", "random", "virtual-group")
SCALINGS: tuple[str, ...] = ("exact", "megatron")

DEFAULT_DROP_RATIO = 0.5
"""Fraction of each expert's neurons ``drop`` re-initialises when no ratio is given."""

_INTEGERS = {"experts": "--experts", "top_k": "--top-k", "granularity": "--granularity",
             "seed": "--seed"}
_NUMBERS = {"drop_ratio": "--drop-ratio", "router_std": "--router-std"}
"""Settings that must be numbers, with the command-line option that sets each."""


@dataclass(frozen=True)
class UpcycleSpec:
    """How to turn each dense MLP into an MoE block.

    Settings that the chosen method would ignore are refused rather than dropped:
    ``drop_ratio`` needs ``method="drop"``, ``granularity`` other than 1 needs
    ``method="granular"``, ``router_std`` needs a router that draws rows."""

    experts: int
    """Routed experts per layer (N = G x R for ``granular``)."""
    top_k: int
    """Experts each token is routed to, 1 to ``experts``."""
    method: Method = "copy"
    granularity: int = 1
    """G: slices of the dense intermediate dimension (``granular``, which needs G >= 2)."""
    shared_expert: bool = False
    """Also make a shared expert from the dense MLP (targets that have one)."""
    drop_ratio: float | None = None
    """Fraction of each expert's neurons re-initialised, in (0, 1] (``drop`` only; None
    there means 0.5, and stays None for the other methods)."""
    router: RouterInit | None = None
    """Router initialisation; None picks ``virtual-group`` for ``granular``, else ``random``."""
    router_std: float | None = None
    """Std of random router rows, finite and > 0; None uses the dense config's
    ``initializer_range`` (or 0.02). Not for ``router="zero"``."""
    target: str = "auto"
    """Target family name, or ``auto`` for the dense family's MoE sibling."""
    seed: int = 0
    scaling: Scaling = "exact"
    """``exact`` preserves the dense function; ``megatron`` scales as Megatron-Core does."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise MoekitError("invalid upcycling settings: " + "; ".join(problems))
        if self.method == "drop" and self.drop_ratio is None:
            object.__setattr__(self, "drop_ratio", DEFAULT_DROP_RATIO)

    def problems(self) -> list[str]:
        """Every inconsistency among the settings (dense shapes are checked later)."""
        found = _type_problems(self)
        if found:
            return found
        if self.method not in METHODS:
            found.append(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.router is not None and self.router not in ROUTERS:
            found.append(f"--router {self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.scaling not in SCALINGS:
            found.append(f"--scaling {self.scaling!r} is not one of {', '.join(SCALINGS)}")
        if not 1 <= self.experts <= MAX_EXPERTS:
            found.append(f"--experts must lie in 1..{MAX_EXPERTS}, not {self.experts}")
        elif not 1 <= self.top_k <= self.experts:
            found.append(f"--top-k must lie in 1..{self.experts} (the number of --experts), "
                         f"not {self.top_k}")
        found.extend(self._granularity_problems())
        found.extend(self._drop_problems())
        found.extend(self._router_problems())
        if self.scaling == "megatron" and self.shared_expert:
            found.append("Megatron-Core's scaling has no shared expert; use --scaling exact")
        return found

    def _granularity_problems(self) -> list[str]:
        g = self.granularity
        if g < 1:
            return [f"--granularity must be at least 1, not {g}"]
        if self.method != "granular" and g != 1:
            return [f"--granularity {g} needs --method granular"]
        if self.method == "granular" and g == 1:
            return ["--method granular needs --granularity 2 or more (with one slice it is "
                    "--method copy)"]
        if self.experts % g or self.top_k % g:
            return [f"--experts ({self.experts}) and --top-k ({self.top_k}) must both be "
                    f"multiples of the granularity ({g}), so that top-k selects whole virtual "
                    "groups"]
        return []

    def _drop_problems(self) -> list[str]:
        ratio = self.drop_ratio
        if ratio is None:
            return []
        if self.method != "drop":
            return [f"--drop-ratio applies to --method drop only, not {self.method}"]
        if not 0.0 < ratio <= 1.0:
            return [f"--drop-ratio must lie in (0, 1], not {ratio}"]
        return []

    def _router_problems(self) -> list[str]:
        std = self.router_std
        if std is None:
            return []
        if not (math.isfinite(std) and std > 0):
            return [f"--router-std must be a finite number above 0, not {std}"]
        if self.router == "zero":
            return ["--router-std has no effect with --router zero (no rows are drawn)"]
        return []

    @property
    def router_init(self) -> RouterInit:
        """The router initialisation this run uses."""
        if self.router is not None:
            return self.router
        return "virtual-group" if self.method == "granular" else "random"

    @property
    def groups(self) -> int:
        """R: virtual groups of G experts each (the expansion rate)."""
        return self.experts // self.granularity

    def projection_scales(self, megatron_root: int = 3,
                          megatron_activation_scale: float | None = None,
                          weight_sum: float = 1.0) -> dict[str, float]:
        """Factor for each routed expert projection (gate, up, down); see the module doc.

        Megatron-Core multiplies every projection by the ``megatron_root``-th root (3 for
        gated or squared-ReLU MLPs, 2 otherwise) of its activation scale, G for
        renormalised top-k (``megatron_activation_scale`` overrides it). Exact scaling
        divides down by ``weight_sum``, what a token's selected routing weights add up to
        (Megatron-Core's top-k scaling factor; 1 for every Hugging Face target)."""
        g = self.granularity
        if self.scaling == "megatron":
            root = float(megatron_activation_scale or g) ** (1 / megatron_root)
            return {"gate": root, "up": root, "down": root}
        routed_share = 0.5 if self.shared_expert else 1.0
        return {"gate": 1.0, "up": 1.0, "down": g * routed_share / weight_sum}

    def preserves_function(self) -> tuple[bool, str]:
        """Whether the MoE computes the dense function at initialisation, and why."""
        if self.scaling == "megatron" and self.granularity > 1:
            return False, ("Megatron-Core's cube-root scaling of gate, up and down is not "
                           "exact: SiLU is not homogeneous")
        if self.method == "drop":
            return False, "Drop-Upcycling re-initialises part of every expert by design"
        if self.granularity > 1 and self.router_init != "virtual-group":
            return False, ("granular experts need a virtual-group router, else top-k does not "
                           "select whole groups")
        return True, "renormalised top-k weights sum to one over whole copies of the dense MLP"


def _type_problems(spec: UpcycleSpec) -> list[str]:
    """Settings of the wrong type (a string for a count, a bool for a number, ...)."""
    found = []
    for name, option in _INTEGERS.items():
        if not _is_integer(getattr(spec, name)):
            found.append(f"{option} must be an integer, not {getattr(spec, name)!r}")
    for name, option in _NUMBERS.items():
        value = getattr(spec, name)
        if value is not None and not (isinstance(value, numbers.Real)
                                      and not isinstance(value, bool)):
            found.append(f"{option} must be a number, not {value!r}")
    if not isinstance(spec.shared_expert, bool):
        found.append(f"shared_expert must be True or False, not {spec.shared_expert!r}")
    for name in ("method", "router", "scaling", "target"):
        value = getattr(spec, name)
        if value is not None and not isinstance(value, str):
            found.append(f"--{name} must be a name, not {value!r}")
    return found


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for one random draw, stable across runs, processes and machines."""
    text = "/".join(str(x) for x in (seed, *labels)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
