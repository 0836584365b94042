"""Capture and restore every random-number generator a training run draws from, so a resumed run
continues with exactly the numbers it would have drawn (bit-exact on a CPU).

The captured state holds only tensors, ints, floats, strings, lists and dicts, so it travels
inside a checkpoint loaded with ``torch.load(weights_only=True)``.

Covered: Python's ``random``, NumPy's legacy global RNG (``np.random.*``), torch's CPU generator,
every CUDA device's generator (when CUDA is initialised), and any named ``torch.Generator`` or
``numpy.random.Generator`` the caller owns (e.g. the data order's and the augmentations').
"""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

Generators = Mapping[str, "torch.Generator | np.random.Generator"]


def capture_rng_state(generators: Generators | None = None) -> dict[str, Any]:
    """The state of every global RNG and of ``generators`` (name -> generator)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": _cuda_states(),
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        state["generators"][name] = _generator_state(name, gen)
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Generators | None = None) -> None:
    """Put back what :func:`capture_rng_state` captured; ``generators`` receive their saved states.

    Raises:
        KeyError: a generator in ``generators`` was not captured (the names must match).
    """
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    _restore_cuda(state.get("cuda") or [])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"no saved RNG state for generator {name!r} (saved: {sorted(saved)}); "
                           "resume with the generators the run was started with")
        _set_generator_state(gen, saved[name])


def _generator_state(name: str, gen: Any) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"type": "torch", "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        # Plain dict of str/int (PCG64 ints exceed 64 bits; pickle keeps them exact).
        return {"type": "numpy", "state": gen.bit_generator.state}
    raise TypeError(f"generator {name!r} is a {type(gen).__name__}; expected torch.Generator or "
                    "numpy.random.Generator")


def _set_generator_state(gen: Any, saved: Mapping[str, Any]) -> None:
    if saved["type"] == "torch":
        if not isinstance(gen, torch.Generator):
            raise TypeError("a torch.Generator state cannot be restored into a numpy Generator")
        gen.set_state(saved["state"])
    else:
        if not isinstance(gen, np.random.Generator):
            raise TypeError("a numpy Generator state cannot be restored into a torch.Generator")
        gen.bit_generator.state = saved["state"]


def _cuda_states() -> list[torch.Tensor]:
    # Only when CUDA is already in use: querying it would otherwise initialise a context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return []


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        log.warning("the checkpoint holds CUDA RNG states but CUDA is not available; the resumed run's "
                    "GPU random numbers will differ from an uninterrupted run")
        return
    count = torch.cuda.device_count()
    if count != len(states):
        log.warning("the checkpoint holds %d CUDA RNG states but %d device(s) are visible; restoring "
                    "the first %d", len(states), count, min(count, len(states)))
    for index, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s, index)
