"""Backward of one stage, whole (B) or split into input gradients now (I) and weight gradients later (W).

The split works on any autograd graph, without custom autograd Functions:

- I runs ``torch.autograd.grad`` from the stage outputs to the stage inputs only. Autograd then skips
  every gradient that leads only to parameters (a linear layer computes its input gradient, not its
  weight gradient). Nodes on the input path that also have edges toward parameters ("frontier" nodes)
  get a pre-hook that keeps the gradient flowing into them.
- W restarts each frontier node from its kept gradient, asking only for its edges toward parameters,
  then runs one backward from those edges (and from outputs that never touched the inputs) into the
  parameters' ``.grad``. Each edge's gradient is computed exactly once, from the same graph and the same
  saved tensors, so parameters receive the gradients of an unsplit backward.
- An edge toward parameters that more than one node feeds (a parameter used twice inside the stage) is
  computed in I instead, where all its contributions are summed by autograd; if such a target is also
  fed from outside the input path, the stage falls back to a full backward in I.

A stage class may replace all this with a faster path by defining ``split_backward(module, roots,
grads, inputs) -> (input_grads, weight_fn)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

Root = torch.Tensor | GradientEdge
WeightFn = Callable[[], None]


def _node(root: Root) -> Node | None:
    if isinstance(root, GradientEdge):
        return root.node
    return root.grad_fn if root.grad_fn is not None else get_gradient_edge(root).node


def _edge(root: Root) -> GradientEdge:
    return root if isinstance(root, GradientEdge) else get_gradient_edge(root)


def _live(roots: Sequence[Root], grads: Sequence[torch.Tensor | None]) -> list[tuple[Root, torch.Tensor]]:
    """The (root, gradient) pairs that lead anywhere: a gradient was given and the root is in a graph."""
    return [(r, g) for r, g in zip(roots, grads)
            if g is not None and (isinstance(r, GradientEdge) or r.requires_grad)]


def backward_full(roots: Sequence[Root], grads: Sequence[torch.Tensor | None],
                  inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """B: accumulate the parameter gradients and return the gradients of ``inputs`` (None where unused)."""
    pairs = _live(roots, grads)
    if pairs:
        torch.autograd.backward([_edge(r) for r, _ in pairs], [g for _, g in pairs])
    return [t.grad if t.requires_grad else None for t in inputs]


def backward_split(roots: Sequence[Root], grads: Sequence[torch.Tensor | None],
                   inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], WeightFn]:
    """I now, W later: returns the gradients of ``inputs`` and a function that accumulates the weight gradients."""
    pairs = _live(roots, grads)
    diff = [t for t in inputs if t.requires_grad]
    if not pairs:
        return [None] * len(inputs), _nothing
    if not diff:  # first stage: nothing to send upstream, everything is weight gradient
        return [None] * len(inputs), lambda: torch.autograd.backward([_edge(r) for r, _ in pairs],
                                                                     [g for _, g in pairs])
    plan = _Plan([_node(r) for r, _ in pairs], {get_gradient_edge(t).node for t in diff})
    if plan.fallback:
        return backward_full([r for r, _ in pairs], [g for _, g in pairs], inputs), _nothing
    kept: dict[Node, tuple] = {}
    handles = [node.register_prehook(lambda g, node=node: kept.__setitem__(node, g)) for node in plan.frontier]
    early = [GradientEdge(c, nr) for c, nr in plan.early]
    try:
        result = torch.autograd.grad([_edge(r) for r, _ in pairs], diff + early, [g for _, g in pairs],
                                     retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    it = iter(result[:len(diff)])
    input_grads = [next(it) if t.requires_grad else None for t in inputs]
    early_grads = list(zip(early, result[len(diff):]))
    outside = [(_edge(r), g) for (r, g), node in zip(pairs, plan.root_nodes) if node not in plan.on_input_path]

    def weight() -> None:
        edges = [(e, g) for e, g in early_grads + outside if g is not None]
        for node, targets in plan.frontier.items():
            g = kept.get(node)
            if g is None or not targets:
                continue
            slots = [(GradientEdge(node, k), gk) for k, gk in enumerate(g) if gk is not None]
            if not slots:
                continue
            wanted = [GradientEdge(c, nr) for c, nr in targets]
            got = torch.autograd.grad([s for s, _ in slots], wanted, [gk for _, gk in slots], allow_unused=True)
            edges += [(e, t) for e, t in zip(wanted, got) if t is not None]
        kept.clear()
        if edges:
            torch.autograd.backward([e for e, _ in edges], [g for _, g in edges])

    return input_grads, weight


def _nothing() -> None:
    return None


class _Plan:
    """The graph from ``roots``: which nodes lead to the inputs, and which of their edges lead elsewhere."""

    def __init__(self, root_nodes: list[Node | None], input_nodes: set[Node]) -> None:
        self.root_nodes = root_nodes
        order: list[Node] = []  # post-order: children before parents
        seen: set[Node] = set()
        stack = [(n, False) for n in root_nodes if n is not None]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack += [(c, False) for c, _ in node.next_functions if c is not None and c not in seen]
        on_path: set[Node] = set()
        feeders: dict[tuple[Node, int], set[Node]] = {}
        for node in order:
            if node in input_nodes or any(c in on_path for c, _ in node.next_functions if c is not None):
                on_path.add(node)
            for c, nr in node.next_functions:
                if c is not None:
                    feeders.setdefault((c, nr), set()).add(node)
        self.on_input_path = on_path
        # Edges from the input path toward parameters: deferred to W unless several nodes feed the target.
        self.frontier: dict[Node, list[tuple[Node, int]]] = {}
        early: set[tuple[Node, int]] = set()
        self.fallback = False
        for node in on_path:
            for c, nr in node.next_functions:
                if c is None or c in on_path:
                    continue
                if len(feeders[(c, nr)]) == 1:
                    self.frontier.setdefault(node, []).append((c, nr))
                elif feeders[(c, nr)] <= on_path:
                    early.add((c, nr))
                    self.frontier.setdefault(node, [])
                else:
                    self.fallback = True
        self.early = sorted(early, key=lambda e: (id(e[0]), e[1]))
