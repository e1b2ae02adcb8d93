
import pytest
import torch

from sae.tasks.modular import (OPERATIONS, ModularTaskConfig, Operation, build_dataset, equals_token,
                               modular_inverse, op_token)


def reference_answer(op: Operation, a: int, b: int, p: int) -> int:
    """Plain Python, independent of the vectorised code: pow(b, -1, p) for the inverse."""
    if op is Operation.addition:
        return (a + b) % p
    if op is Operation.subtraction:
        return (a - b) % p
    if op is Operation.multiplication:
        return (a * b) % p
    if op is Operation.division:
        return (a * pow(b, -1, p)) % p
    return (a * pow(b, -1, p)) % p if b % 2 == 1 else (a - b) % p


@pytest.mark.parametrize("p", [2, 3, 7, 23, 97])
@pytest.mark.parametrize("op", OPERATIONS)
def test_answers_match_brute_force_table(op, p):
    data = build_dataset(ModularTaskConfig(name=op.value, operations=[op], p=p, train_fraction=0.5))
    a, b = data.tokens[:, 0].tolist(), data.tokens[:, 2].tolist()
    assert data.labels.tolist() == [reference_answer(op, x, y, p) for x, y in zip(a, b)]
    expected_pairs = p * (p - 1) if op is Operation.division else p * p
    assert len(data.labels) == expected_pairs


def test_modular_inverse_matches_pow():
    p = 97
    b = torch.arange(1, p)
    assert modular_inverse(b, p).tolist() == [pow(int(x), -1, p) for x in b]


def test_division_excludes_zero_and_is_not_floor_division():
    data = build_dataset(ModularTaskConfig(name="division", operations=[Operation.division], p=7))
    assert (data.tokens[:, 2] != 0).all()
    row = ((data.tokens[:, 0] == 3) & (data.tokens[:, 2] == 2)).nonzero().item()
    assert data.labels[row].item() == 5  # 3 / 2 = 3 * 4 = 12 = 5 mod 7, while 3 // 2 = 1


@pytest.mark.parametrize("p", [2, 5, 97, 113])
def test_operator_and_equals_tokens_never_collide_with_numbers(p):
    special = [op_token(p, op) for op in OPERATIONS] + [equals_token(p)]
    assert min(special) >= p and len(set(special)) == len(special)


def test_split_is_deterministic_disjoint_and_sized():
    cfg = ModularTaskConfig(operations=[Operation.addition, Operation.division], p=23, train_fraction=0.3, seed=4)
    first, second = build_dataset(cfg), build_dataset(cfg)
    assert torch.equal(first.is_train, second.is_train)
    train_rows = {tuple(t) for t in first.train[0].tolist()}
    test_rows = {tuple(t) for t in first.test[0].tolist()}
    assert not train_rows & test_rows
    assert len(train_rows) + len(test_rows) == len(first.tokens)
    for index in range(2):
        in_op = first.op_ids == index
        assert abs(first.is_train[in_op].float().mean().item() - 0.3) < 0.01
    other_seed = build_dataset(ModularTaskConfig(operations=cfg.operations, p=23, train_fraction=0.3, seed=5))
    assert not torch.equal(first.is_train, other_seed.is_train)


def test_mixed_split_does_not_depend_on_the_other_operations():
    alone = build_dataset(ModularTaskConfig(operations=[Operation.division], p=23))
    mixed = build_dataset(ModularTaskConfig(operations=[Operation.addition, Operation.division], p=23))
    assert torch.equal(alone.is_train, mixed.is_train[mixed.op_ids == 1])


@pytest.mark.parametrize("keys, message", [
    (dict(p=100), "task.p must be a prime"),
    (dict(p=1), "task.p must be a prime"),
    (dict(train_fraction=1.0), "task.train_fraction must be in (0, 1)"),
    (dict(operations=[]), "task.operations must name at least one"),
    (dict(operations=[Operation.addition, Operation.addition]), "task.operations has duplicates"),
])
def test_bad_task_config_is_refused(keys, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModularTaskConfig(**keys)
