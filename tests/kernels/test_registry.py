"""One registry, ``ALGORITHMS``, and the per-algorithm tables that must follow it.

Adding an algorithm means its header under ``kernels/csrc/``, its module under
``kernels/algorithms/`` and its entry in ``ALGORITHMS``; this test then names every table
that still lacks it, and every table entry for an algorithm the registry does not have.
"""

from __future__ import annotations

import pytest
from stepd.kernels import ALGORITHMS, create_optimizer
from stepd.service.tour import CONFIGS as TOUR

from .test_convergence import DIGITS, ROSENBROCK
from .test_parity import CASES as ORACLE_CASES
from .test_sophia import PARITY_CASES as SOPHIAH_CASES

# Parity against an independent implementation: the oracles/ table, and Sophia's against
# SophiaH in test_sophia.py (a ParityCase has no place for a Hessian estimate).
PARITY = {c.algorithm for c in ORACLE_CASES} | ({"sophia"} if SOPHIAH_CASES else set())

# What each table calls an algorithm: table -> the names it covers.
TABLES: dict[str, set[str]] = {
    "oracle parity case (tests/kernels/oracles/*.py CASES, test_sophia.py PARITY_CASES)": PARITY,
    "Rosenbrock convergence case (tests/kernels/test_convergence.py ROSENBROCK)": set(ROSENBROCK),
    "digits convergence case (tests/kernels/test_convergence.py DIGITS)": set(DIGITS),
    "tour entry (service/tour.py CONFIGS)": set(TOUR),
}


@pytest.mark.parametrize("table", TABLES)
def test_every_registered_algorithm_is_in(table: str) -> None:
    missing = sorted(set(ALGORITHMS) - TABLES[table])
    assert not missing, f"no {table} for {', '.join(missing)}"


@pytest.mark.parametrize("table", TABLES)
def test_only_registered_algorithms_are_in(table: str) -> None:
    unknown = sorted(TABLES[table] - set(ALGORITHMS))
    assert not unknown, f"{table} names algorithms not in ALGORITHMS: {', '.join(unknown)}"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_registry_key_is_the_algorithms_own_name(name: str) -> None:
    cls = ALGORITHMS[name]
    assert name == cls.name == cls.hyperparams.algorithm


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) & set(TOUR)))
def test_tour_configs_are_valid_hyperparameters(name: str) -> None:
    create_optimizer(name, backend="reference", **TOUR[name])
