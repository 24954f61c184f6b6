"""PreparedModel: the captured, gated model that training and finalize work on."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx, nn

from hiap_fx.config import PruneConfig
from hiap_fx.errors import StateError
from hiap_fx.gated.bundles import GATES_ATTR, SiteGates
from hiap_fx.gated.cost_model import CostModel, symbol_values
from hiap_fx.gated.decisions import gate_key
from hiap_fx.gated.gates import Gate
from hiap_fx.gated.objective import BudgetController, feasibility
from hiap_fx.graph.ir import CapturedGraph
from hiap_fx.plan import Plan


class PreparedModel(nn.Module):
    """An ordinary ``nn.Module``: the normalised graph of a model with HiAP gates inserted.

    ``forward`` has the original model's signature and output structure. In train mode the
    gates are sampled (Gumbel-Sigmoid, straight-through); in eval mode a unit is kept iff its
    logit is > 0 and its parent macro gate is kept.
    """

    def __init__(self, graph_module: fx.GraphModule, plan: Plan,
                 example_inputs: tuple[torch.Tensor, ...], cost_model: CostModel,
                 config: PruneConfig, captured: Optional[CapturedGraph] = None,
                 latency_model: Optional[CostModel] = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.config = config
        self.cost_model = cost_model
        self.latency_model = latency_model
        self.budget = BudgetController(config.budget_fraction, config.budget_lr, config.budget_kp)
        self._example_inputs = tuple(t.detach().clone() for t in example_inputs)
        # the shared IR the pipeline built (its graph module is ``graph_module``); finalize
        # compiles from it. Of the recorded values only those computed from the example input
        # are kept (training changes the weights the others hold; finalize recomputes them)
        self._input_values = captured.input_values() if captured is not None else {}
        self._input_dependent = set(captured.input_dependent) if captured is not None else set()
        self._frontend = captured.frontend if captured is not None else plan.frontend
        self._model_name = captured.model_name if captured is not None else plan.model

    @property
    def captured(self) -> CapturedGraph:
        """The pipeline's IR of this model: the gated graph module, example inputs, front end and
        plan (what ``finalize`` compiles)."""
        return CapturedGraph(gm=self.graph_module, example_inputs=self._example_inputs,
                             frontend=getattr(self, "_frontend", self.plan.frontend),
                             model_name=getattr(self, "_model_name", self.plan.model), plan=self.plan,
                             values=dict(getattr(self, "_input_values", {})),
                             input_dependent=set(getattr(self, "_input_dependent", set())))

    # --- structure ---------------------------------------------------------------------------

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """The example inputs the model was prepared with."""
        return self._example_inputs

    @property
    def example_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the example inputs."""
        return [tuple(t.shape) for t in self._example_inputs]

    def site_gates(self) -> dict[str, SiteGates]:
        """The gate bundle of every gated site, by site name."""
        container = getattr(self.graph_module, GATES_ATTR, None)
        return {m.site: m for m in container.values()} if container is not None else {}

    def gate_modules(self) -> dict[str, Gate]:
        """Every gate, keyed ``"<site>.<kind>"`` (kind: head, head_dim, qk_dim, ffn, neuron)."""
        return {gate_key(site, kind): g for site, bundle in self.site_gates().items()
                for kind, g in bundle.gates().items()}

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel-Sigmoid temperature of every gate."""
        for g in self.gate_modules().values():
            g.set_temperature(tau)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    # --- pickling: the plan refers to graph nodes by name, and unpickling a GraphModule re-traces
    # its code (which renames nodes), so the names are saved and put back in order.

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_hiap_node_names"] = [n.name for n in self.graph_module.graph.nodes]
        return state

    def __setstate__(self, state: dict) -> None:
        names = state.pop("_hiap_node_names", None)
        self.__dict__.update(state)
        if names is not None:
            _restore_node_names(self.graph_module, names)

    # --- cost --------------------------------------------------------------------------------

    def decisions(self) -> dict[str, torch.Tensor]:
        """The eval-mode decision of every unit (``True`` = kept), by gate key. Raises
        ``StateError`` when a gate logit is NaN or infinite (no decision can be read from it)."""
        gates = self.gate_modules()
        for key, g in gates.items():
            bad = ~torch.isfinite(g.logits.detach())
            if bool(bad.any()):
                raise StateError(f"gate {key} has {int(bad.sum())} non-finite logit(s) (units "
                                 f"{bad.nonzero().flatten().tolist()[:8]}): training diverged or the "
                                 "logits were overwritten. Resume from an earlier checkpoint, lower "
                                 "the learning rate or set PruneConfig(max_grad_norm=...)")
        return {k: g.hard().bool() for k, g in gates.items()}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, with a mismatch (a state dict of another model or of the
        dense model, which has no gates) raised as ``StateError`` naming the differing keys."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state_dict and hasattr(state_dict[k], "shape")
                  and tuple(state_dict[k].shape) != tuple(v.shape)]
        if shapes or (strict and (missing or unexpected)):
            parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                     f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                     f"{len(shapes)} of another shape (e.g. {shapes[:3]})" if shapes else ""]
            raise StateError("state dict does not fit this prepared model: " +
                             "; ".join(p for p in parts if p) + ". Load a state dict saved from a "
                             "model prepared from the same architecture and example input size "
                             "(hiap_fx.save / load), or load dense weights into the model before "
                             "hiap_fx.prepare")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _values(self, hard: bool) -> torch.Tensor:
        if hard:
            per_gate = {k: d.double() for k, d in self.decisions().items()}
        else:
            per_gate = {k: g.probability().double() for k, g in self.gate_modules().items()}
        if not per_gate:
            return torch.zeros(0, dtype=torch.float64)
        return symbol_values(self.cost_model.sources, per_gate, self.cost_model.group_sizes)

    def _expected(self, values: list[torch.Tensor], which: str, model: Optional[CostModel] = None) -> torch.Tensor:
        out = (model or self.cost_model).evaluate(values, which)
        return out if isinstance(out, torch.Tensor) else torch.tensor(float(out), dtype=torch.float64)

    def expected_macs(self, which: str = "total") -> torch.Tensor:
        """Expected MACs of the hardened network at the example input size (differentiable in
        every gate logit). ``which``: ``"total"``, ``"macro"`` or ``"micro"`` terms."""
        return self._expected(list(self._values(hard=False).unbind()), which)

    def hard_macs(self) -> int:
        """MACs of the network eval mode selects now (what ``finalize`` returns)."""
        values = [int(v) for v in self._values(hard=True).round().long().tolist()]
        return int(self.cost_model.evaluate(values))

    def min_macs(self) -> int:
        """MACs with every gate closed: what no gate decision removes (patch embedding, head,
        norms, units hiap_fx cannot cut). The lowest reachable ``target_macs`` is this over
        :attr:`dense_macs`."""
        return self._all_closed(self.hard_macs)

    def _all_closed(self, read: Any) -> Any:
        gates = list(self.gate_modules().values())
        saved = [g.logits.detach().clone() for g in gates]
        try:
            with torch.no_grad():
                for g in gates:
                    g.logits.fill_(-1e4)
                return read()
        finally:
            with torch.no_grad():
                for g, logits in zip(gates, saved):
                    g.logits.copy_(logits)

    @property
    def dense_macs(self) -> int:
        """MACs of the original model at the example inputs (the reference counter's count)."""
        return int(self.cost_model.evaluate([int(v) for v in self.cost_model.dense_values()]))

    # --- latency (cost="latency") ----------------------------------------------------------------

    def _latency(self) -> CostModel:
        if self.latency_model is None:
            raise StateError("this model has no latency model: prepare it with "
                             "PruneConfig(cost='latency', target_latency=...)")
        return self.latency_model

    def expected_latency(self) -> torch.Tensor:
        """Expected latency (seconds at ``latency_batch``, on the machine that calibrated) of the
        hardened network, differentiable in every gate logit."""
        return self._expected(list(self._values(hard=False).unbind()), "total", self._latency())

    def hard_latency(self) -> float:
        """Predicted latency (seconds) of the network eval mode selects now."""
        values = [int(v) for v in self._values(hard=True).round().long().tolist()]
        return float(self._latency().evaluate(values))

    @property
    def dense_latency(self) -> float:
        """Latency (seconds) of the dense model at ``latency_batch`` as measured at calibration
        (the user's model when it was timed, else the prediction with every unit kept): what
        ``target_latency`` is a fraction of."""
        return dense_cost(self._latency())

    # --- the budgeted cost: MACs or latency ----------------------------------------------------

    @property
    def budget_model(self) -> CostModel:
        """The cost model the budget steers: the latency model with ``cost="latency"``, else MACs."""
        return self._latency() if self.config.cost == "latency" else self.cost_model

    def budget_ratio(self, hard: bool = True) -> float:
        """The budgeted cost (MACs or latency) of the eval-mode network (``hard``) or its
        expectation, as a fraction of dense."""
        model = self.budget_model
        if hard:
            values: list = [int(v) for v in self._values(hard=True).round().long().tolist()]
        else:
            values = list(self._values(hard=False).unbind())
        return float(model.evaluate(values)) / dense_cost(model)

    def min_budget_ratio(self) -> float:
        """The budgeted cost with every gate closed, as a fraction of dense."""
        return float(self._all_closed(self.budget_ratio))

    def schedule(self, step: int, total: int) -> float:
        """Set everything that follows training progress; call once per step before the forward.

        - Gumbel-Sigmoid temperature: exponential from ``tau_start`` to ``tau_end`` over ``total``.
        - With ``target_macs``: the controller's reference falls (cubic) from the expected MACs at
          step 0 to the target over ``budget_ramp`` of the run, and in the last
          ``hard_control_fraction`` the controller steers the MACs eval mode selects.
        Returns the temperature set.
        """
        cfg = self.config
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, total - 1))
        self.set_temperature(tau)
        target = cfg.budget_fraction
        if target is not None:
            budget = self.budget
            if step == 0 or float(budget.start) < 0:
                with torch.no_grad():
                    budget.start.fill_(self.budget_ratio(hard=False))
            frac = min(1.0, step / max(1.0, cfg.budget_ramp * total))
            budget.reference.fill_(target + (float(budget.start) - target) * (1 - frac) ** 3)
            budget.use_hard.fill_(step >= round(total * (1.0 - cfg.hard_control_fraction)))
        return tau

    def land_on_budget(self) -> float:
        """At the end of training: if the MACs eval mode selects are further than
        ``budget_tolerance`` from ``target_macs``, shift every gate logit by the smallest common
        offset that lands them within it. Returns the offset (0.0 if none was needed)."""
        from hiap_fx.gated.budget import land_on_budget

        cfg = self.config
        target = cfg.budget_fraction
        if target is None:
            return 0.0
        shift = land_on_budget(self, target, cfg.budget_tolerance)
        gap = self.budget_ratio() - target
        if abs(gap) > cfg.budget_tolerance + 1e-12:
            import warnings

            from hiap_fx.errors import HiapWarning

            what, field = ("latency", "target_latency") if cfg.cost == "latency" else ("MACs", "target_macs")
            warnings.warn(f"budget missed: the kept {what} are {100 * (target + gap):.1f}% of "
                          f"dense, {100 * gap:+.1f} pp from {field}={target} (tolerance "
                          f"{100 * cfg.budget_tolerance:.1f} pp). The gates are too undecided to land "
                          "closer (a run too short for its target: train longer) or the units are "
                          "too coarse (e.g. whole heads / FFN blocks only)", HiapWarning, stacklevel=2)
        return shift

    def hiap_loss(self) -> torch.Tensor:
        """Budget and feasibility terms of the objective (the task loss is not included).

        ``multiplier * (lambda_macro * E[macro cost] + lambda_micro * E[micro cost]) / dense cost
        + lambda_feasibility * feasibility``, the cost in MACs or, with ``cost="latency"``, in
        calibrated seconds. In train mode with a target set, each call also takes one
        budget-controller step from the current expected cost.
        """
        cfg = self.config
        model = self.budget_model
        dense = dense_cost(model)
        values = list(self._values(hard=False).unbind())  # one set of probabilities for both terms
        macro = self._expected(values, "macro", model) / dense
        micro = self._expected(values, "micro", model) / dense
        if self.training and torch.is_grad_enabled():
            ratio = self.budget_ratio() if bool(self.budget.use_hard) else float((macro + micro).detach())
            self.budget.update(ratio)
        cost = self.budget.multiplier.double() * (cfg.lambda_macro * macro + cfg.lambda_micro * micro)
        feas = feasibility(self.gate_modules(), cfg.min_heads, cfg.min_head_dim_fraction,
                           cfg.min_neuron_fraction)
        return (cost + cfg.lambda_feasibility * feas.double()).float()

    def extra_repr(self) -> str:
        return (f"attention sites={len(self.plan.attention)}, ffn sites={len(self.plan.ffn)}, "
                f"gates={len(self.gate_modules())}, front end={self.plan.frontend}")


def dense_cost(model: CostModel) -> float:
    """What budget fractions of ``model`` refer to: its reference, else its dense value."""
    if model.reference is not None:
        return float(model.reference)
    return float(model.evaluate([int(v) for v in model.dense_values()]))


def _restore_node_names(gm: fx.GraphModule, names: list[str]) -> None:
    """Give the nodes of a re-traced graph module their original names (same order)."""
    from hiap_fx.errors import HiapError

    nodes = list(gm.graph.nodes)
    if len(nodes) != len(names):
        raise HiapError(f"cannot restore the prepared graph after loading: {len(nodes)} nodes, "
                        f"{len(names)} saved names; save and load with the same torch version")
    for node, name in zip(nodes, names):
        node.name = name  # candidate names for the copy below
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
        if env[node].name != node.name:
            raise HiapError(f"cannot restore node name {node.name!r} after loading the prepared model")
    gm.graph = graph
    gm.recompile()
