"""The symbolic cost model: total MACs as one sympy expression in kept-unit symbols.

Symbols (per site):
  * ``<site>.h<i>``  1 if query head i is on (macro), ``<site>.z<k>`` 1 if kv head k keeps at least
    one value dim, ``<site>.v<k>`` / ``<site>.q<k>`` kept value / q-k dims of kv head k (micro);
  * ``<site>.on`` 1 if the FFN block is on (macro), ``<site>.n`` kept neurons (micro);
  * ``N`` tokens per sequence (isotropic models only) and ``B`` batch.
Substituting the eval decisions gives the exact MACs of the compact model. Apart from the padded
widths (:class:`Widest`, a max over the heads of a layer: finalize pads live heads to the widest kept width), every
term is multilinear in quantities drawn from disjoint sets of independent gates, so substituting
each symbol's expectation gives the exact expected MACs of the hardened network; for the padded
terms it gives (expected live heads) x (widest expected width), whose gradient presses on the
widest heads, the only ones whose dims save compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import sympy
import torch
from sympy.printing.pycode import PythonCodePrinter

from hiap_fx.errors import HiapError

#: terms per compiled sum (Python compiles an n-term sum as a nest n deep)
_TERMS_PER_SUM = 200


@dataclass
class SymbolSource:
    """How one symbol is valued from a gate's decisions.

    ``reduce``: ``"unit"`` (the gate's unit ``index``), ``"any"`` (1 if any unit of group ``index``
    is on), ``"count"`` (number of units on in group ``index``).
    """

    symbol: sympy.Symbol
    gate: str
    reduce: str
    index: int
    micro: bool


@dataclass(frozen=True)
class NodeTerm:
    """How the cost of one gated MAC node is formed, for cost models beyond MACs (latency).

    ``kind``: ``"weighted"`` (linear / conv: ``factors`` is the kept size of each weight axis) or
    ``"sdpa"`` / ``"qk"`` / ``"av"`` (an attention kernel over ``heads`` live heads padded to
    ``qk_width`` / ``v_width``; ``dims``: (query rows per head and token, heads, query tokens,
    key tokens, q/k dim, v dim) at the example input)."""

    kind: str
    factors: tuple[sympy.Expr, ...] = ()
    heads: sympy.Expr = sympy.Integer(0)
    qk_width: sympy.Expr = sympy.Integer(0)
    v_width: sympy.Expr = sympy.Integer(0)
    dims: tuple[int, ...] = ()


def _chunks(expr: sympy.Expr) -> list[sympy.Expr]:
    """``expr`` as sums of at most :data:`_TERMS_PER_SUM` terms each (their total is ``expr``)."""
    if not isinstance(expr, sympy.Add) or len(expr.args) <= _TERMS_PER_SUM:
        return [expr]
    terms = expr.args
    return [sympy.Add(*terms[i:i + _TERMS_PER_SUM]) for i in range(0, len(terms), _TERMS_PER_SUM)]


def _summed(function: Callable, first: int) -> Callable:
    """A compiled tuple of partial sums as the (macro, micro) pair: the first ``first`` summed,
    then the rest."""
    def pair(*args: Any) -> tuple[Any, Any]:
        parts = function(*args)
        return sum(parts[:first]), sum(parts[first:])
    return pair


@dataclass
class CostModel:
    """Total MACs of the gated model as a function of its gate decisions.

    Attributes:
        expr: sympy expression of total MACs (symbols described in the module docstring).
        node_exprs: node name -> its MAC expression (only MAC-bearing nodes).
        sources: how each gate-derived symbol is valued, in argument order.
        batch, tokens: the batch symbol and the token symbol (``None`` when the model is not
            isotropic: its attentions run over different token counts).
        example_batch, example_tokens: their values at the example inputs.
        group_sizes: gate key -> units per group (dims per head, neurons per FFN).
        factored_nodes: nodes whose expression is a constant times a product over heads (a
            site-alive factor); they hold no micro symbols and are not expanded.
        terms: node name -> how its cost is formed (nodes whose cost depends on gates).
        site_alive: site name -> 1 while the site runs (any head live / the block on).
        unit: what the expression counts (``"MACs"``, or ``"seconds"`` for a latency model).
        reference: the cost budget fractions refer to when it is not the expression's dense value
            (a latency model: the user's dense model, timed in the same run).
    """

    expr: sympy.Expr
    node_exprs: dict[str, sympy.Expr]
    sources: list[SymbolSource]
    batch: sympy.Symbol
    tokens: Optional[sympy.Symbol]
    example_batch: int
    example_tokens: int
    group_sizes: dict[str, int] = field(default_factory=dict)
    factored_nodes: set[str] = field(default_factory=set)
    terms: dict[str, NodeTerm] = field(default_factory=dict)
    site_alive: dict[str, sympy.Expr] = field(default_factory=dict)
    unit: str = "MACs"
    reference: Optional[float] = None
    macro_expr: sympy.Expr = field(init=False)
    micro_expr: sympy.Expr = field(init=False)
    _compiled: dict[str, Callable] = field(init=False, default_factory=dict)
    _forms: dict[tuple, tuple[sympy.Expr, sympy.Expr]] = field(init=False, default_factory=dict)
    _node_forms: list[tuple[tuple, tuple[int, ...]]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        micro = {s.symbol for s in self.sources if s.micro}
        split = _MicroSplit({s.symbol: i for i, s in enumerate(self.sources)}, micro)
        macro_terms: list[sympy.Expr] = []
        micro_terms: list[sympy.Expr] = []
        for name, e in self.node_exprs.items():
            # no micro symbol: macro as a whole (no expansion)
            expand = name not in self.factored_nodes and bool(e.free_symbols & micro)
            macro_part, micro_part = split(e, expand)
            macro_terms.append(macro_part)
            micro_terms.append(micro_part)
        self.macro_expr = sympy.Add(*macro_terms)
        self.micro_expr = sympy.Add(*micro_terms)
        self._forms, self._node_forms = split.forms, split.uses

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_compiled"] = {}  # compiled functions are rebuilt on first use after unpickling
        return state

    # --- evaluation --------------------------------------------------------------------------

    @property
    def arguments(self) -> list[sympy.Symbol]:
        """Argument order of the compiled functions: gate symbols, then batch and tokens."""
        extra = [self.batch] + ([self.tokens] if self.tokens is not None else [])
        return [s.symbol for s in self.sources] + extra

    def _function(self, which: str) -> Callable:
        """The compiled expression ``which`` ("total", "macro" or "micro"): one function
        computes the macro and micro parts (the total is their sum). Each distinct node form
        (repeated blocks share theirs) is printed once and called per node on its symbols."""
        if "parts" not in self._compiled:
            self._compiled["parts"] = self._compile_parts()
        parts = self._compiled["parts"]
        if which == "macro":
            return lambda *args: parts(*args)[0]
        if which == "micro":
            return lambda *args: parts(*args)[1]
        return lambda *args: sum(parts(*args))

    def _compile_parts(self) -> Callable:
        extra = [self.batch] + ([self.tokens] if self.tokens is not None else [])
        # plain identifiers: lambdify would otherwise rename symbols it cannot print as names
        plain = [sympy.Symbol(f"x{i}") for i in range(max((len(k[1]) for k in self._forms), default=0) + len(extra))]
        printer = PythonCodePrinter({"fully_qualified_modules": False, "inline": True,
                                     "allow_unknown_functions": True, "order": "none"})
        functions = {}
        for key, (macro_form, micro_form) in self._forms.items():
            own = len(key[1])
            rename = dict(zip(_canonical(own) + extra, plain))
            # a sum of thousands of terms would print as one expression that Python compiles as a
            # nest of that depth (RecursionError): it is compiled as a tuple of shorter sums
            macro_chunks = _chunks(macro_form.xreplace(rename))
            micro_chunks = _chunks(micro_form.xreplace(rename))
            functions[key] = _summed(sympy.lambdify(plain[:own + len(extra)], (*macro_chunks, *micro_chunks),
                                                    modules=[{"Widest": maximum}, "math"], cse=False,
                                                    printer=printer), len(macro_chunks))
        calls = [(functions[key], positions) for key, positions in self._node_forms]
        first_extra = len(self.sources)

        def parts(*args: Any) -> tuple[Any, Any]:
            tail = args[first_extra:]
            macro: Any = 0
            micro: Any = 0
            for function, positions in calls:
                a, b = function(*[args[i] for i in positions], *tail)
                macro, micro = macro + a, micro + b
            return macro, micro

        return parts

    def by_site(self) -> dict[str, sympy.Expr]:
        """The expression split by site (nodes without gate symbols under ``"fixed"``)."""
        site_of = {s.symbol: s.gate.rsplit(".", 1)[0] for s in self.sources}
        parts: dict[str, list[sympy.Expr]] = {}
        for e in self.node_exprs.values():
            sites = sorted({site_of[sym] for sym in e.free_symbols if sym in site_of})
            parts.setdefault(sites[0] if sites else "fixed", []).append(e)
        return {k: sympy.factor_terms(sympy.Add(*v)) for k, v in parts.items()}

    def compile(self) -> "CostModel":
        """Compile the macro and micro expressions (the total is their sum) to one Python function
        now (done once)."""
        self._function("total")
        return self

    def evaluate(self, values: Sequence, which: str = "total", batch: Optional[int] = None,
                 tokens: Optional[int] = None):
        """Evaluate with ``values`` for the gate symbols (numbers or tensors) at a batch size and
        token count (defaults: the example's)."""
        args = list(values) + [self.example_batch if batch is None else batch]
        self._check_tokens(tokens)
        if self.tokens is not None:
            args.append(self.example_tokens if tokens is None else tokens)
        return self._function(which)(*args)

    def _check_tokens(self, tokens: Optional[int]) -> None:
        if self.tokens is None and tokens is not None and tokens != self.example_tokens:
            raise HiapError("the cost model has no token symbol: this model's attentions do not all "
                            "run over one sequence of N tokens (windowed, pooled or class attention), "
                            "so MACs at another token count are not defined by N alone; prepare the "
                            "model at the resolution you want instead")

    def dense_values(self) -> list[int]:
        """Symbol values of the dense model (every unit on)."""
        return [1 if s.reduce in ("unit", "any") else int(self.group_sizes[s.gate]) for s in self.sources]

    def at(self, tokens: Optional[int] = None, batch: Optional[int] = None) -> sympy.Expr:
        """The expression with the token count and/or batch substituted."""
        subs = {}
        if batch is not None:
            subs[self.batch] = batch
        self._check_tokens(tokens)
        if tokens is not None and self.tokens is not None:
            subs[self.tokens] = tokens
        return self.expr.subs(subs)


def _canonical(count: int) -> list[sympy.Symbol]:
    """The first ``count`` canonical symbols (the gate symbols' assumptions, see cost.py)."""
    return [sympy.Symbol(f"canonical_{i}", nonnegative=True, integer=True) for i in range(count)]


class _MicroSplit:
    """Node expressions split into their terms without and with micro symbols (expanded).

    Repeated blocks give the same expression up to the names of their sites' symbols: each is
    renamed to canonical symbols (in argument order), and each distinct form is expanded once.
    ``forms``: (canonical form, micro flags) -> (macro part, micro part) in canonical symbols;
    ``uses``: per node, its form and the argument positions of its own symbols."""

    def __init__(self, position: dict[sympy.Symbol, int], micro: set[sympy.Symbol]) -> None:
        self.position, self.micro = position, micro
        self.forms: dict[tuple, tuple[sympy.Expr, sympy.Expr]] = {}
        self.uses: list[tuple[tuple, tuple[int, ...]]] = []

    def __call__(self, e: sympy.Expr, expand: bool) -> tuple[sympy.Expr, sympy.Expr]:
        own = sorted((s for s in e.free_symbols if s in self.position), key=self.position.__getitem__)
        rename = dict(zip(own, _canonical(len(own))))
        form = e.xreplace(rename)
        key = (form, tuple(s in self.micro for s in own), expand)
        if key not in self.forms:
            if expand:
                micro = {rename[s] for s in own if s in self.micro}
                parts: tuple[list[sympy.Expr], list[sympy.Expr]] = ([], [])
                for term in sympy.Add.make_args(sympy.expand(form)):
                    parts[bool(term.free_symbols & micro)].append(term)
                self.forms[key] = (sympy.Add(*parts[0]), sympy.Add(*parts[1]))
            else:
                self.forms[key] = (form, sympy.Integer(0))
        self.uses.append((key, tuple(self.position[s] for s in own)))
        if not expand:
            return e, sympy.Integer(0)
        back = {c: s for s, c in rename.items()}
        macro_part, micro_part = self.forms[key]
        return macro_part.xreplace(back), micro_part.xreplace(back)


class Widest(sympy.Function):
    """The widest kept width among the live heads of a layer: ``max`` of its arguments.

    Unlike ``sympy.Max`` it does not try to order symbolic arguments (slow, and never decidable
    here); with every argument a number it is that number."""

    @classmethod
    def eval(cls, *args):  # noqa: D102 - sympy hook
        if all(a.is_Number for a in args):
            return max(args)
        return None


SOFT_WIDTH = 2.0  # units (dims) over which the gradient of a padded width spreads among heads


def maximum(*values):
    """``Widest`` in the compiled expressions: the exact max of plain numbers (hard values) or of
    tensors (expected values). For tensors the value is the exact max, and the gradient is that
    of a soft max (softmax weights over ``SOFT_WIDTH``): a head a few dims narrower than the
    widest may be the widest in a draw of the gates, so it shares the pressure."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return max(values)
    x = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
    hard = x.amax(0)
    soft = SOFT_WIDTH * torch.logsumexp(x / SOFT_WIDTH, 0)
    return hard + (soft - soft.detach())


def symbol_values(sources: list[SymbolSource], decisions: dict[str, torch.Tensor],
                  groups: dict[str, int]) -> torch.Tensor:
    """Values of the gate symbols (in source order) from per-gate vectors of hard 0/1 decisions
    or of on-probabilities: a unit's value, 1 - prod(1 - x) over a group, or the sum over a group."""
    parts, offsets, total = [], {}, 0
    for key, vec in decisions.items():
        grouped = vec.reshape(-1, groups[key]) if key in groups else vec.reshape(1, -1)
        for reduce, v in (("unit", vec), ("any", 1.0 - torch.prod(1.0 - grouped, -1)),
                          ("count", grouped.sum(-1))):
            offsets[(key, reduce)] = total
            parts.append(v.reshape(-1))
            total += v.numel()
    flat = torch.cat(parts)
    index = torch.tensor([offsets[(s.gate, s.reduce)] + s.index for s in sources], dtype=torch.long,
                         device=flat.device)
    return flat[index]


SYMBOL_LEGEND = ("B batch, N tokens; <site>.h<i> head i on, <site>.z<k> kv head k keeps a value "
                 "dim, <site>.v<k> / <site>.q<k> kept value / q-k dims of kv head k, <site>.on FFN "
                 "block on, <site>.n kept neurons; Widest(...) the widest kept width among the live "
                 "heads of a layer (every live head runs padded to it)")


def format_cost(cost: CostModel) -> str:
    """The MAC formula of a prepared model, one line per site."""
    lines = [f"MAC formula ({SYMBOL_LEGEND}):"]
    for site, expr in cost.by_site().items():
        lines.append(f"  {site}: {expr}")
    lines.append(f"  total at the example input, all on: {cost.evaluate(cost.dense_values()):,}")
    return "\n".join(lines)
