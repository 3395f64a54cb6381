"""AdamW8bit, Lion8bit and SGD with 8-bit momentum: against the published algorithm written
here in NumPy (Dettmers et al. 2022, blockwise dynamic quantization: bitsandbytes' scheme),
and against bitsandbytes' own 8-bit optimizers where they are installed.

The NumPy oracle quantizes by brute force over all codes (nearest, neighbours parting at
their float32 midpoint as in bitsandbytes' CUDA kernels, a tie to the lower code) and
updates with torch.optim's formulas and scalars (``1 - beta`` in double, as Python floats);
it agrees with stepd to float32 rounding of the parameter update.

bitsandbytes' CPU backend quantizes through a 65536-bin table of [-1, 1] instead of the
nearest code, so its codes differ from the nearest ones now and then (and near 0 always);
its trajectories follow stepd's within a few steps' worth of quantization noise, the
tolerance of those cases. Its SGD8bit is left out: SGD applies the momentum unnormalised,
so that noise accumulates into the parameters beyond a meaningful tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import ParityCase

BLOCK = 256


def published_map(signed: bool) -> np.ndarray:
    """The dynamic map of Dettmers (2016) as bitsandbytes builds it: per decimal exponent
    10^-6..10^0, the midpoints of an even split of [0.1, 1] into 2^i (signed: mirrored)
    or 2^(i+1) parts, plus 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        parts = 2**i if signed else 2 ** (i + 1)
        edges = [0.1 + 0.9 * k / parts for k in range(parts + 1)]
        for lo, hi in itertools.pairwise(edges):
            v = 10.0 ** (i - 6) * (lo + hi) / 2
            values += [v, -v] if signed else [v]
    return np.array(sorted(values), dtype=np.float32)


def nearest_codes(y: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Brute force over all 256 codes: the nearest, where two neighbours part at their
    float32 midpoint (``(lower + upper) * 0.5f``, as bitsandbytes' CUDA kernels compare)
    and a value on it takes the lower code."""
    mids = (table[:-1] + table[1:]) * np.float32(0.5)
    return (y.reshape(-1, 1) > mids[None, :]).sum(axis=1).astype(np.uint8)


class Blockwise8bit:
    """A torch-parameter optimizer (``step()`` reads ``p.grad``) keeping each state as
    uint8 codes + float32 absmax per 256 elements, updated in float32."""

    def __init__(self, params: Sequence[Any], algorithm: str, **hp: Any) -> None:
        self.params = list(params)
        self.algorithm = algorithm
        self.hp = hp
        self.param_groups = [{"params": self.params, "lr": hp["lr"]}]
        self.state: dict[int, dict[str, Any]] = {}
        self.maps = {True: published_map(True), False: published_map(False)}

    def _load(self, st: dict, key: str, signed: bool) -> np.ndarray:
        codes, absmax = st[key]
        scale = np.repeat(absmax, BLOCK)[: codes.size]
        return self.maps[signed][codes] * scale

    def _store(self, st: dict, key: str, signed: bool, value: np.ndarray) -> None:
        blocks = -(-value.size // BLOCK)
        absmax = np.zeros(blocks, np.float32)
        codes = np.empty(value.size, np.uint8)
        for b in range(blocks):
            part = value[b * BLOCK : (b + 1) * BLOCK]
            absmax[b] = np.abs(part).max()
            y = part / absmax[b] if absmax[b] > 0 else np.zeros_like(part)
            codes[b * BLOCK : (b + 1) * BLOCK] = nearest_codes(y, self.maps[signed])
        st[key] = (codes, absmax)

    @torch.no_grad()
    def step(self) -> None:
        hp, f32 = self.hp, np.float32
        lr = f32(self.param_groups[0]["lr"])
        for tp in self.params:
            p = tp.detach().numpy().reshape(-1)  # shares memory with the torch parameter
            g = tp.grad.numpy().reshape(-1).astype(np.float32)
            st = self.state.setdefault(id(tp), {"step": 0})
            st["step"] += 1
            t = st["step"]
            zeros = (np.zeros(p.size, np.uint8), np.zeros(-(-p.size // BLOCK), np.float32))
            if self.algorithm == "adamw8bit":
                beta1, beta2 = hp.get("betas", (0.9, 0.999))
                b1, b2 = f32(beta1), f32(beta2)
                c1, c2 = f32(1 - beta1), f32(1 - beta2)  # in double, as torch's Python floats
                eps, wd = f32(hp.get("eps", 1e-8)), f32(hp.get("weight_decay", 1e-2))
                st.setdefault("m", zeros)
                st.setdefault("v", zeros)
                m = self._load(st, "m", True)
                m = m + c1 * (g - m)  # torch.optim.AdamW's lerp
                v = b2 * self._load(st, "v", False) + c2 * g * g
                p *= f32(1 - float(lr) * float(wd))
                bc1, bc2 = 1 - float(b1) ** t, np.sqrt(1 - float(b2) ** t)
                p -= f32(float(lr) / bc1) * m / (np.sqrt(v) / f32(bc2) + eps)
                self._store(st, "m", True, m)
                self._store(st, "v", False, v)
            elif self.algorithm == "lion8bit":
                beta1, beta2 = hp.get("betas", (0.9, 0.99))
                b1, b2, c1, c2 = f32(beta1), f32(beta2), f32(1 - beta1), f32(1 - beta2)
                wd = hp.get("weight_decay", 0.0)
                st.setdefault("m", zeros)
                m = self._load(st, "m", True)
                p *= f32(1 - float(lr) * wd)
                p -= lr * np.sign(b1 * m + c1 * g)
                self._store(st, "m", True, b2 * m + c2 * g)
            else:  # sgd8bit: torch.optim.SGD's momentum
                mu, damp = hp.get("momentum", 0.9), hp.get("dampening", 0.0)
                g = g + f32(hp.get("weight_decay", 0.0)) * p
                st.setdefault("b", zeros)
                b = g.copy() if t == 1 else f32(mu) * self._load(st, "b", True) + f32(1 - damp) * g
                d = g + f32(mu) * b if hp.get("nesterov", False) else b
                p -= lr * d
                self._store(st, "b", True, b)


def _published(algorithm: str, **hp: Any) -> Any:
    return lambda params: Blockwise8bit(params, algorithm, **hp)


# Shapes past one block, with a partial last block, and below one.
SHAPES_8BIT = ((), (1,), (37,), (16, 9), (300,), (3, 5, 7), (40, 40))

CASES = [
    ParityCase(
        "adamw8bit-published",
        "adamw8bit",
        {"lr": 1e-3, "weight_decay": 0.05},
        _published("adamw8bit", lr=1e-3, weight_decay=0.05),
        shapes=SHAPES_8BIT,
    ),
    ParityCase(
        "adamw8bit-published-betas",
        "adamw8bit",
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.0},
        _published("adamw8bit", lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
        shapes=SHAPES_8BIT,
    ),
    ParityCase(
        "lion8bit-published",
        "lion8bit",
        {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1},
        _published("lion8bit", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1),
        shapes=SHAPES_8BIT,
    ),
    ParityCase(
        "sgd8bit-published",
        "sgd8bit",
        {"lr": 0.02, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        _published("sgd8bit", lr=0.02, momentum=0.9, dampening=0.1, weight_decay=0.01),
        shapes=SHAPES_8BIT,
    ),
    ParityCase(
        "sgd8bit-published-nesterov",
        "sgd8bit",
        {"lr": 0.01, "momentum": 0.8, "nesterov": True},
        _published("sgd8bit", lr=0.01, momentum=0.8, nesterov=True),
        shapes=SHAPES_8BIT,
    ),
]

try:
    import bitsandbytes as bnb
except ImportError:  # an optional oracle: the published algorithm above stands in
    bnb = None

if bnb is not None:
    SHAPES_BNB = ((1,), (37,), (16, 9), (300,), (40, 40))  # bitsandbytes takes no 0-d state
    CASES += [
        ParityCase(
            # 50 steps of lr 1e-3: 5e-4 is half a step's worth of noise
            "adamw8bit-bitsandbytes",
            "adamw8bit",
            {"lr": 1e-3, "weight_decay": 0.05},
            lambda p: bnb.optim.AdamW8bit(p, lr=1e-3, weight_decay=0.05, min_8bit_size=0),
            shapes=SHAPES_BNB,
            rtol=0.0,
            atol=5e-4,
        ),
        ParityCase(
            # Lion's step is ±lr: a sign flipped by quantization noise costs 2 lr
            "lion8bit-bitsandbytes",
            "lion8bit",
            {"lr": 1e-4, "weight_decay": 0.1},
            lambda p: bnb.optim.Lion8bit(p, lr=1e-4, weight_decay=0.1, min_8bit_size=0),
            shapes=SHAPES_BNB,
            rtol=0.0,
            atol=6e-4,
        ),
    ]
