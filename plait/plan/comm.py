"""Collective times on the links a process group actually crosses.

Ranks are numbered node by node and a layout's groups are strided slices of that numbering
(layout.py): a tp group is ``tp`` neighbours; a dp group's members are ``tp x cp`` apart; pipeline
neighbours are ``tp x cp x dp`` apart. A group of n ranks with stride d has k = min(n, G/d)
members in each of n/k nodes (G GPUs per node). Collectives run hierarchically, the way NCCL's
rings and trees use every GPU's own NIC: the intra-node part moves (k-1)/k of the data over the
node's links, the inter-node part moves 1/k of it per GPU over the network.

All sizes are bytes; all results seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.hardware import Cluster


@dataclass(frozen=True)
class GroupShape:
    """How a group of ``size`` ranks spreads over nodes."""

    size: int
    per_node: int  # members in one node
    nodes: int  # nodes the group spans

    @property
    def crosses_nodes(self) -> bool:
        return self.nodes > 1


def group_shape(cluster: Cluster, size: int, stride: int) -> GroupShape:
    """Members per node and nodes spanned for ``size`` ranks spaced ``stride`` apart."""
    if size <= 1:
        return GroupShape(1, 1, 1)
    per_node = max(1, min(size, cluster.gpus_per_node // stride))
    return GroupShape(size, per_node, -(-size // per_node))


def _phases(cluster: Cluster, shape: GroupShape, nbytes: float, factor: float) -> float:
    """A reduce-scatter-like pass (``factor`` = 1) or all-reduce (2) of ``nbytes`` per rank,
    hierarchical: inside the node over the intra link, then across nodes over the network with
    each member carrying 1/per_node of the data."""
    k, n = shape.per_node, shape.nodes
    intra, inter = cluster.intra_link, cluster.inter_link
    seconds = 0.0
    if k > 1:
        seconds += factor * (k - 1) / k * nbytes / intra.achieved_bytes_per_s + factor * (k - 1) * intra.latency_s
    if n > 1:
        seconds += factor * (n - 1) / n * nbytes / k / inter.achieved_bytes_per_s + factor * (n - 1) * inter.latency_s
    return seconds


def all_reduce(cluster: Cluster, size: int, stride: int, nbytes: float) -> float:
    """Ring all-reduce: 2(n-1)/n of the payload per rank."""
    return _phases(cluster, group_shape(cluster, size, stride), nbytes, 2.0) if size > 1 else 0.0


def _partial_as_all_reduce(cluster: Cluster) -> bool:
    return cluster.intra_link.partial_as_all_reduce or cluster.inter_link.partial_as_all_reduce


def all_gather(cluster: Cluster, size: int, stride: int, nbytes: float) -> float:
    """All-gather of a ``nbytes`` result: (n-1)/n of it per rank (on gloo, an all-reduce's time)."""
    if _partial_as_all_reduce(cluster):
        return all_reduce(cluster, size, stride, nbytes)
    return _phases(cluster, group_shape(cluster, size, stride), nbytes, 1.0) if size > 1 else 0.0


def reduce_scatter(cluster: Cluster, size: int, stride: int, nbytes: float) -> float:
    """Reduce-scatter of a ``nbytes`` input: the bytes of an all-gather (on gloo, a whole
    all-reduce)."""
    return all_gather(cluster, size, stride, nbytes)


def all_to_all(cluster: Cluster, size: int, stride: int, nbytes: float) -> float:
    """Each rank sends (n-1)/n of its ``nbytes``: the share to ranks in its node over the intra
    link, the rest over the network, both at once."""
    if size <= 1:
        return 0.0
    shape = group_shape(cluster, size, stride)
    inside = (shape.per_node - 1) / size * nbytes
    outside = (size - shape.per_node) / size * nbytes
    intra = inside / cluster.intra_link.achieved_bytes_per_s + (cluster.intra_link.latency_s if inside else 0.0)
    inter = outside / cluster.inter_link.achieved_bytes_per_s + (cluster.inter_link.latency_s if outside else 0.0)
    return max(intra, inter)


def point_to_point(cluster: Cluster, size: int, stride: int, nbytes: float) -> float:
    """One send between neighbours of a ``size``-rank group spaced ``stride`` apart (a pipeline):
    over the network as soon as the group leaves one node, since its slowest hop sets the pace."""
    link = cluster.inter_link if group_shape(cluster, size, stride).crosses_nodes else cluster.intra_link
    latency = link.latency_s if link.p2p_latency_s is None else link.p2p_latency_s
    rate = link.achieved_bytes_per_s if link.p2p_bytes_per_s is None else link.p2p_bytes_per_s
    return latency + nbytes / rate
