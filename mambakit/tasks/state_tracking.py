"""State-tracking tasks (the Mamba-3 paper's, after Grazzi et al. and Deletang et al.): parity and arithmetic
modulo 5, without and with brackets.

Both generators return ``(input_ids, targets)`` like the others of `mambakit.tasks.generators` (batch, seq_len),
-100 where there is no loss. Every sequence starts with BOS (a fixed reference: the first state). ``supervision``:

- ``"final"`` (the paper's metric): one target per sequence, at the last position: the parity of all the bits, or the
  value of the whole expression at the closing ``=``;
- ``"running"`` (denser training signal): a target wherever the answer so far is defined: the parity of the bits up
  to each bit, and the value of the top-level expression so far after each top-level operand (a digit outside
  brackets or the ``)`` that closes a top-level bracket), plus the final one; for the nested brackets, after each
  digit the sum of the signed digits so far (`signed_sums`).

Parity vocabulary: bits 0 and 1 (their own ids, also the answers), BOS = 2. Arithmetic vocabulary: digits 0..4
(ids 0..4, also the answers), ``+`` 5, ``-`` 6, ``*`` 7, ``(`` 8, ``)`` 9, ``=`` 10, BOS 11, PAD 12. An expression
without brackets (and one with brackets of the ``"chain"`` form) is generated as ``E -> T | E op T``,
``T -> digit | ( E )`` and evaluated (``order``) with ``*`` before ``+ -`` (``"precedence"``, as Deletang et al.) or
left to right (``"left"``), a bracket first in both; its length is odd, so with BOS and ``=`` an even seq_len has
one PAD after BOS. With brackets of the ``"nested"`` form (the default, Deletang et al.'s) every operation is in
brackets, ``( L op R )`` with op ``+`` or ``-``, and ``-d`` / ``(-d)`` negate a digit; any length, no PAD.
"""
from __future__ import annotations

import random
from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError

IGNORE = -100
SUPERVISIONS = ("final", "running")
MODULUS = 5
PARITY_VOCAB = {"bos": 2, "vocab_size": 3}
ARITH_VOCAB = {"+": 5, "-": 6, "*": 7, "(": 8, ")": 9, "=": 10, "bos": 11, "pad": 12, "vocab_size": 13}
_OPS = ("+", "-", "*")
#: How an expression is evaluated: ``*`` before ``+ -`` (Deletang et al.), or left to right.
ORDERS = ("precedence", "left")
#: How expressions with brackets are generated: Deletang et al.'s nested ``( L op R )``, or a chain ``E op T``.
BRACKET_FORMS = ("nested", "chain")


def _check(batch: int, seq_len: int, minimum: int, supervision: str) -> None:
    for name, value, least in (("batch", batch, 1), ("seq_len", seq_len, minimum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise MambaKitError(f"{name} must be an integer >= {least}, got {value!r}")
    if supervision not in SUPERVISIONS:
        raise MambaKitError(f"supervision must be one of {SUPERVISIONS}, got {supervision!r}")


def parity(batch: int, seq_len: int, generator: torch.Generator, supervision: str = "final") -> tuple[Tensor, Tensor]:
    """BOS then seq_len - 1 random bits; targets: the parity of the bits (at the last position, or at every bit
    for the running parity)."""
    _check(batch, seq_len, 2, supervision)
    bits = torch.randint(0, 2, (batch, seq_len - 1), generator=generator)
    ids = torch.cat((torch.full((batch, 1), PARITY_VOCAB["bos"], dtype=torch.long), bits), 1)
    running = torch.cumsum(bits, 1) % 2
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    if supervision == "running":
        targets[:, 1:] = running
    else:
        targets[:, -1] = running[:, -1]
    return ids, targets


def _expression(length: int, brackets: bool, rng: random.Random) -> list[str]:
    """A random expression of exactly `length` (odd) tokens: digits as str(d), operators, brackets."""
    if length == 1:
        return [str(rng.randrange(MODULUS))]
    if brackets and rng.random() < 0.1:  # the whole expression in brackets
        return ["("] + _expression(length - 2, brackets, rng) + [")"]
    right = 1
    if brackets and length >= 5 and rng.random() < 0.4:  # a bracketed right operand of odd length 3..length-2
        right = 2 * rng.randrange(1, (length - 1) // 2) + 1
    operand = ["("] + _expression(right - 2, brackets, rng) + [")"] if right > 1 else [str(rng.randrange(MODULUS))]
    return _expression(length - 1 - right, brackets, rng) + [rng.choice(_OPS)] + operand


def _nested_expression(length: int, rng: random.Random) -> list[str]:
    """Deletang et al.'s bracketed form: a random expression of exactly `length` (>= 1) tokens, ``d``, ``-d``,
    ``(d)``, ``(-d)`` for lengths 1-4, else ``( L op R )`` with op in ``+ -`` and len(L) uniform in 1..length-4."""
    if length <= 4:
        core = (["-"] if length % 2 == 0 else []) + [str(rng.randrange(MODULUS))]
        return ["("] + core + [")"] if length > 2 else core
    left = rng.randrange(1, length - 3)
    return (["("] + _nested_expression(left, rng) + [rng.choice(("+", "-"))]
            + _nested_expression(length - 3 - left, rng) + [")"])


def signed_sums(tokens: list[str]) -> list[Optional[int]]:
    """The running answer of a ``+ -`` expression (unary minus allowed), modulo 5: after each digit the sum of the
    digits so far, each with its sign (the value of the whole with every operand not yet read taken as 0); None
    after the other tokens. The last digit's entry is the value of the whole expression."""
    if "*" in tokens:
        raise MambaKitError("signed_sums takes + - expressions only, got one with *")
    signs, total, out, pending = [1], 0, [], 1  # the sign of the current bracket, and of the next operand in it
    for tok in tokens:
        if tok == "-":
            pending = -pending
        elif tok == "(":
            signs.append(signs[-1] * pending)
            pending = 1
        elif tok == ")":
            signs.pop()
        elif tok != "+":
            total, pending = (total + signs[-1] * pending * int(tok)) % MODULUS, 1
        out.append(total if tok.isdigit() else None)
    return out


def _apply(op: Optional[str], acc: int, value: int) -> int:
    if op is None:
        return value
    if op == "+":
        return (acc + value) % MODULUS
    if op == "-":
        return (acc - value) % MODULUS
    return (acc * value) % MODULUS


class _Frame:
    """One bracket level of `evaluate_tokens`: ``left``: the value so far and the pending operator; ``precedence``:
    the sum of the finished terms, the sign and product of the current term, and whether a ``*`` is pending."""

    def __init__(self, order: str) -> None:
        self.order, self.acc, self.op, self.sign, self.term = order, 0, None, 1, 0

    def operator(self, op: str) -> None:
        if self.order == "precedence" and op != "*":
            self.acc, self.sign, self.term = (self.acc + self.sign * self.term) % MODULUS, 1 if op == "+" else -1, 0
        self.op = op

    def operand(self, value: int) -> None:
        if self.order == "left":
            self.acc = _apply(self.op, self.acc, value)
        else:
            self.term = self.term * value % MODULUS if self.op == "*" else value
        self.op = None

    @property
    def value(self) -> int:
        return self.acc if self.order == "left" else (self.acc + self.sign * self.term) % MODULUS


def evaluate_tokens(tokens: list[str], order: str = "precedence") -> list[Optional[int]]:
    """The value of the top-level expression so far after each token (None where it is not defined: operators,
    inside brackets); the last entry is the value of the whole expression. ``order``: ``"precedence"`` (``*`` before
    ``+ -``, as Deletang et al.) or ``"left"`` (every operator left to right); brackets first in both."""
    if order not in ORDERS:
        raise MambaKitError(f"order must be one of {ORDERS}, got {order!r}")
    stack = [_Frame(order)]
    out: list[Optional[int]] = []
    for tok in tokens:
        value = None
        if tok in _OPS:
            stack[-1].operator(tok)
        elif tok == "(":
            stack.append(_Frame(order))
        else:
            value = stack.pop().value if tok == ")" else int(tok)
            stack[-1].operand(value)
        out.append(stack[0].value if value is not None and len(stack) == 1 else None)
    return out


def modular_arithmetic(batch: int, seq_len: int, generator: torch.Generator, brackets: bool = False,
                       supervision: str = "final", order: str = "precedence",
                       bracket_form: str = "nested") -> tuple[Tensor, Tensor]:
    """BOS, [PAD], a random expression modulo 5 (with brackets or without), ``=``; targets: its value at ``=`` (and,
    running, the value so far after each top-level operand), evaluated in `order` (`ORDERS`). With brackets,
    `bracket_form` (`BRACKET_FORMS`): ``"nested"``, Deletang et al.'s (`_nested_expression`: ``+ -`` only, every
    operation in brackets, unary minus; any length, no PAD; running answers: `signed_sums`), or ``"chain"``
    (``E op T`` with ``+ - *``, some operands bracketed; PAD when seq_len is even). Returns (ids, targets), each
    (batch, seq_len) int64."""
    _check(batch, seq_len, 3, supervision)
    if order not in ORDERS:
        raise MambaKitError(f"order must be one of {ORDERS}, got {order!r}")
    if bracket_form not in BRACKET_FORMS:
        raise MambaKitError(f"bracket_form must be one of {BRACKET_FORMS}, got {bracket_form!r}")
    nested = brackets and bracket_form == "nested"
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    pad = 0 if nested else 1 - seq_len % 2
    length = seq_len - 2 - pad
    head = [ARITH_VOCAB["bos"]] + [ARITH_VOCAB["pad"]] * pad
    ids, targets = [], []
    for _ in range(batch):
        tokens = _nested_expression(length, rng) if nested else _expression(length, brackets, rng)
        values = signed_sums(tokens) if nested else evaluate_tokens(tokens, order)
        ids.append(head + [ARITH_VOCAB[t] if t in ARITH_VOCAB else int(t) for t in tokens] + [ARITH_VOCAB["="]])
        answers = [IGNORE if v is None else v for v in values] if supervision == "running" else [IGNORE] * length
        targets.append([IGNORE] * len(head) + answers + [[v for v in values if v is not None][-1]])
    return torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long)
