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
from dataclasses import dataclass
from typing import Literal

from ..errors import MoekitError

Method = Literal["copy", "granular", "drop"]
RouterInit = Literal["zero", "random", "virtual-group"]
Scaling = Literal["exact", "megatron"]

METHODS: tuple[str, ...] = ("copy", "granular", "drop")
ROUTERS: tuple[str, ...] = ("zero", "random", "virtual-group")
SCALINGS: tuple[str, ...] = ("exact", "megatron")


@dataclass(frozen=True)
class UpcycleSpec:
    """How to turn each dense MLP into an MoE block."""

    experts: int
    """Routed experts per layer (N = G x R for ``granular``)."""
    top_k: int
    """Experts each token is routed to."""
    method: Method = "copy"
    granularity: int = 1
    """G: slices of the dense intermediate dimension (``granular`` only)."""
    shared_expert: bool = False
    """Also make a shared expert from the dense MLP (targets that have one)."""
    drop_ratio: float = 0.5
    """Fraction of each expert's neurons re-initialised (``drop`` only)."""
    router: RouterInit | None = None
    """Router initialisation; None picks ``virtual-group`` for ``granular``, else ``random``."""
    router_std: float | None = None
    """Std of random router rows; None uses the config's ``initializer_range`` (or 0.02)."""
    target: str = "auto"
    """Target family name, or ``auto`` for the dense family's MoE sibling."""
    seed: int = 0
    scaling: Scaling = "exact"
    """``exact`` preserves the dense function; ``megatron`` scales as Megatron-Core does."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise MoekitError("invalid upcycling settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency among the settings (dense shapes are checked later)."""
        found = []
        if self.method not in METHODS:
            found.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.router is not None and self.router not in ROUTERS:
            found.append(f"router {self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.scaling not in SCALINGS:
            found.append(f"scaling {self.scaling!r} is not one of {', '.join(SCALINGS)}")
        if self.experts < 1 or not 1 <= self.top_k <= self.experts:
            found.append(f"need 1 <= top-k ({self.top_k}) <= experts ({self.experts})")
        if self.granularity < 1:
            found.append(f"granularity must be at least 1, not {self.granularity}")
        elif self.method != "granular" and self.granularity != 1:
            found.append(f"granularity {self.granularity} needs --method granular")
        elif self.experts % self.granularity or self.top_k % self.granularity:
            found.append(f"experts ({self.experts}) and top-k ({self.top_k}) must both be "
                         f"multiples of the granularity ({self.granularity}), so that top-k "
                         "selects whole virtual groups")
        if not 0.0 <= self.drop_ratio <= 1.0:
            found.append(f"drop ratio must lie in [0, 1], not {self.drop_ratio}")
        if self.scaling == "megatron" and self.shared_expert:
            found.append("Megatron-Core's scaling has no shared expert; use --scaling exact")
        return found

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
                          megatron_activation_scale: float | None = None) -> dict[str, float]:
        """Factor for each routed expert projection (gate, up, down); see the module doc.

        Megatron-Core multiplies every projection by the ``megatron_root``-th root (3 for
        gated or squared-ReLU MLPs, 2 otherwise) of its activation scale, G for
        renormalised top-k (``megatron_activation_scale`` overrides it)."""
        g = self.granularity
        if self.scaling == "megatron":
            root = float(megatron_activation_scale or g) ** (1 / megatron_root)
            return {"gate": root, "up": root, "down": root}
        routed_share = 0.5 if self.shared_expert else 1.0
        return {"gate": 1.0, "up": 1.0, "down": g * routed_share}

    def preserves_function(self) -> tuple[bool, str]:
        """Whether the MoE computes the dense function at initialisation, and why."""
        if self.scaling == "megatron" and self.granularity > 1:
            return False, ("Megatron-Core's cube-root scaling of gate, up and down is not "
                           "exact: SiLU is not homogeneous")
        if self.method == "drop" and self.drop_ratio > 0:
            return False, "Drop-Upcycling re-initialises part of every expert by design"
        if self.granularity > 1 and self.router_init != "virtual-group":
            return False, ("granular experts need a virtual-group router, else top-k does not "
                           "select whole groups")
        return True, "renormalised top-k weights sum to one over whole copies of the dense MLP"


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for one random draw, stable across runs, processes and machines."""
    text = "/".join(str(x) for x in (seed, *labels)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
