"""Modular arithmetic tasks for grokking: sequences `[a, op, b, =]` -> answer in Z_p.

Token layout for a prime p (the same for every task, so a `mixed` model and a single-operation
model with the same p share a vocabulary):
    0 .. p-1                 the numbers
    p + i                    the operator token of OPERATIONS[i]
    p + len(OPERATIONS)      the `=` token
The host predicts the answer at the `=` position, over the p numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class Operation(str, Enum):
    addition = "addition"
    subtraction = "subtraction"
    multiplication = "multiplication"
    division = "division"
    conditional = "conditional"


OPERATIONS = list(Operation)


def vocab_size(p: int) -> int:
    return p + len(OPERATIONS) + 1


def op_token(p: int, op: Operation) -> int:
    return p + OPERATIONS.index(Operation(op))


def equals_token(p: int) -> int:
    return p + len(OPERATIONS)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def valid_b_values(op: Operation, p: int) -> torch.Tensor:
    """Division needs b invertible (b != 0); conditional divides only for odd b (never 0)."""
    b = torch.arange(p)
    return b[b != 0] if Operation(op) is Operation.division else b


def answers(op: Operation, a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """Vectorised answers. Division is a * b^-1 mod p (Fermat: b^(p-2)), not floor division.

    Conditional is Power et al. (2022)'s `a / b if b is odd else a - b`.
    """
    op = Operation(op)
    if op is Operation.addition:
        return (a + b) % p
    if op is Operation.subtraction:
        return (a - b) % p
    if op is Operation.multiplication:
        return (a * b) % p
    if op is Operation.division:
        return (a * modular_inverse(b, p)) % p
    if op is Operation.conditional:
        quotient = (a * modular_inverse(torch.where(b == 0, 1, b), p)) % p
        return torch.where(b % 2 == 1, quotient, (a - b) % p)
    raise ValueError(f"unknown operation {op!r}")


def modular_inverse(b: torch.Tensor, p: int) -> torch.Tensor:
    """b^(p-2) mod p by square-and-multiply, in int64 (safe for p < 3e9)."""
    result = torch.ones_like(b)
    base = b % p
    exponent = p - 2
    while exponent:
        if exponent & 1:
            result = (result * base) % p
        base = (base * base) % p
        exponent >>= 1
    return result


@dataclass
class ModularTaskConfig:
    """`task.*` keys: which operations, the prime modulus, the split."""

    name: str = "addition"
    operations: list[Operation] = field(default_factory=lambda: [Operation.addition])
    p: int = 97
    train_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_prime(self.p):
            raise ValueError(f"task.p must be a prime (modular division needs a field), got {self.p}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"task.train_fraction must be in (0, 1), got {self.train_fraction}")
        if not self.operations:
            raise ValueError("task.operations must name at least one of " + ", ".join(o.value for o in Operation))
        if len(set(self.operations)) != len(self.operations):
            raise ValueError(f"task.operations has duplicates: {[Operation(o).value for o in self.operations]}")


@dataclass
class ModularDataset:
    """Every (a, op, b) of the chosen operations, with a fixed train/test split.

    tokens:  [n, 4] int64, `[a, op, b, =]`
    labels:  [n] int64, the answer
    op_ids:  [n] int64, index into `operations` (for per-operation metrics)
    is_train:[n] bool
    """

    p: int
    operations: list[Operation]
    tokens: torch.Tensor
    labels: torch.Tensor
    op_ids: torch.Tensor
    is_train: torch.Tensor

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[self.is_train], self.labels[self.is_train]

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[~self.is_train], self.labels[~self.is_train]


def build_dataset(task: ModularTaskConfig) -> ModularDataset:
    """All pairs for each operation, split per operation so every operation gets `train_fraction`.

    The split depends only on (p, operation, train_fraction, seed): adding an operation to a
    mixed task does not reshuffle the others.
    """
    p, operations, train_fraction, seed = task.p, task.operations, task.train_fraction, task.seed
    chunks = []
    for op_index, op in enumerate(operations):
        b_values = valid_b_values(op, p)
        a, b = torch.cartesian_prod(torch.arange(p), b_values).unbind(1)
        n = a.numel()
        tokens = torch.stack(
            [a, torch.full_like(a, op_token(p, op)), b, torch.full_like(a, equals_token(p))], dim=1
        )
        generator = torch.Generator().manual_seed(seed * 1000 + OPERATIONS.index(Operation(op)))
        order = torch.randperm(n, generator=generator)
        is_train = torch.zeros(n, dtype=torch.bool)
        is_train[order[: round(train_fraction * n)]] = True
        chunks.append((tokens, answers(op, a, b, p), torch.full((n,), op_index), is_train))
    tokens, labels, op_ids, is_train = (torch.cat(parts) for parts in zip(*chunks))
    return ModularDataset(p, [Operation(o) for o in operations], tokens, labels, op_ids, is_train)
