"""Graph algorithms on a model's DAG of named operations and tensors: ancestors, crossing tensors, cut points,
segments, the tensors each group of operations takes and gives. Pure: plain names, no TensorFlow, no broker.

The splitter's ModelGraph and the planner's CostGraph both keep one (`graph.dag`) and answer these queries from it.
A model input is either produced by no node (the planner's graph) or by a node of its own that does nothing else
(the splitter's input nodes, here called sources); the algorithms treat both alike.

Sets of nodes are bit masks over the topological order: bit i stands for node `order[i]`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from itertools import islice


class Dag:
    """Nodes in topological order, each with the tensors it reads and produces; the model's inputs and outputs."""

    def __init__(
        self,
        nodes: Iterable[tuple[str, Sequence[str], Sequence[str]]],
        inputs: Sequence[str],
        outputs: Sequence[str],
    ):
        """`nodes`: (name, tensors read, tensors produced), dependencies first; a tensor read twice counts once."""
        self.order: list[str] = []
        self.reads: dict[str, list[str]] = {}
        self.produces: dict[str, list[str]] = {}
        self.producer: dict[str, str] = {}  # tensor -> node; a model input no node produces is absent
        self.consumers: dict[str, list[str]] = {t: [] for t in inputs}
        for name, reads, produces in nodes:
            self.order.append(name)
            self.reads[name] = list(dict.fromkeys(reads))
            self.produces[name] = list(produces)
            for t in self.reads[name]:
                self.consumers.setdefault(t, []).append(name)
            for t in produces:
                self.producer[t] = name
                self.consumers.setdefault(t, [])
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.order)}
        self.full = (1 << len(self.order)) - 1
        self.sources = self.mask_of(self.producer[t] for t in self.inputs if t in self.producer)

    @cached_property
    def ancestor_masks(self) -> list[int]:
        """Bit i of entry j is set when node i is node j or one of its ancestors."""
        masks: list[int] = []
        for name in self.order:
            m = 1 << self.index[name]
            for t in self.reads[name]:
                p = self.producer.get(t)
                if p is not None:
                    m |= masks[self.index[p]]
            masks.append(m)
        return masks

    def mask_of(self, names: Iterable[str]) -> int:
        m = 0
        for n in names:
            m |= 1 << self.index[n]
        return m

    def names_in(self, mask: int) -> list[str]:
        return [n for i, n in enumerate(self.order) if mask >> i & 1]

    def upstream(self, tensor: str) -> int:
        """The producer of `tensor` with all its ancestors (nothing for a model input no node produces)."""
        p = self.producer.get(tensor)
        return 0 if p is None else self.ancestor_masks[self.index[p]]

    def prefix(self, tensors: Iterable[str]) -> int:
        """The part before a cut after `tensors`: their producers with all their ancestors, and every source."""
        m = self.sources
        for t in tensors:
            m |= self.upstream(t)
        return m

    def _crossing(self, mask: int):
        for i, name in enumerate(self.order):
            if mask >> i & 1:
                for t in self.produces[name]:
                    if any(not mask >> self.index[c] & 1 for c in self.consumers[t]):
                        yield t

    def crossing(self, mask: int) -> list[str]:
        """Tensors produced inside `mask` and consumed by a node outside it, in topological order."""
        return list(self._crossing(mask))

    def cut_points(self, *, outputs_from_last_part: bool) -> list[str]:
        """Tensors that are, alone, all that passes from the part before them to the part after.

        The part before a cut at t is t's producer with all its ancestors and every source. It must hold every
        consumer of every model input (so no model input is needed after it; an input nothing consumes does not
        count), t must be the only tensor it sends onward, and the rest must still have an operation.

        `outputs_from_last_part` also refuses a cut with a model output before it, so that every output leaves
        from the last part. The chain planner needs that: it prices a plan as a chain of segments and charges the
        hop that returns the outputs to the client from the last segment only. The splitter does not: a part may
        hand a final output back early (the manifest marks it final) while later parts go on.
        """
        input_consumers = self.mask_of(c for t in self.inputs for c in self.consumers[t])
        output_producers = (
            self.mask_of(self.producer[t] for t in self.outputs if t in self.producer) if outputs_from_last_part else 0
        )
        points = []
        for i, name in enumerate(self.order):
            if self.sources >> i & 1:
                continue
            prefix = self.ancestor_masks[i] | self.sources
            if prefix == self.full or input_consumers & ~prefix or output_producers & prefix:
                continue
            crossing = list(islice(self._crossing(prefix), 2))
            if len(crossing) == 1 and crossing[0] in self.produces[name]:
                points.append(crossing[0])
        return points

    def parts_between(self, prefixes: Sequence[int]) -> list[list[str]]:
        """The nodes of each part when the graph is cut after each of `prefixes` (nested masks, smallest first):
        what each prefix adds to the one before it, then the rest. Sources belong to no part."""
        parts, done = [], self.sources
        for prefix in [*prefixes, self.full]:
            parts.append(self.names_in(prefix & ~done))
            done = prefix
        return parts

    def segments(self, cuts: Sequence[str]) -> list[tuple[list[str], str | None]]:
        """The graph cut at each of `cuts` (single-tensor cut points, in order): (nodes, the tensor leaving them,
        None for the last)."""
        parts = self.parts_between([self.prefix([t]) for t in cuts])
        return list(zip(parts, [*cuts, None]))

    def boundaries(self, groups: Sequence[Sequence[str]]) -> list[tuple[list[str], list[str]]]:
        """For each group of nodes (disjoint groups): (the tensors it takes from outside, model inputs included;
        the tensors it gives: those a node outside it consumes, and model outputs), each in order of first use."""
        owner = {n: i for i, g in enumerate(groups) for n in g}
        finals = set(self.outputs)
        out = []
        for i, nodes in enumerate(groups):
            takes: dict[str, None] = {}
            gives: dict[str, None] = {}
            for n in nodes:
                for t in self.reads[n]:
                    if owner.get(self.producer.get(t)) != i:
                        takes[t] = None
                for t in self.produces[n]:
                    if t in finals or any(owner.get(c) != i for c in self.consumers[t]):
                        gives[t] = None
            out.append((list(takes), list(gives)))
        return out


class DagQueries:
    """The Dag's queries as a graph's own, for a graph that keeps its Dag in `self.dag`."""

    dag: Dag

    @property
    def order(self) -> list[str]:
        return self.dag.order

    @property
    def index(self) -> dict[str, int]:
        return self.dag.index

    @property
    def ancestor_masks(self) -> list[int]:
        return self.dag.ancestor_masks

    def mask_of(self, names: Iterable[str]) -> int:
        return self.dag.mask_of(names)

    def names_in(self, mask: int) -> list[str]:
        return self.dag.names_in(mask)

    def crossing(self, mask: int) -> list[str]:
        return self.dag.crossing(mask)

    def upstream(self, tensor: str) -> int:
        return self.dag.upstream(tensor)
