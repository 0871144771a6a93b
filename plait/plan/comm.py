"""Collective times on the links a process group actually crosses.

Ranks are numbered node by node and a layout's groups are strided slices of that numbering
(layout.py): a tp group is ``tp`` neighbours; a dp group's members are ``tp x cp`` apart; pipeline
neighbours are ``tp x cp x dp`` apart. A group of n ranks with stride d has k = min(n, G/d)
members in each of n/k nodes (G GPUs per node). Collectives run hierarchically, the way NCCL's
rings and trees use every GPU's own NIC: the intra-node part moves (k-1)/k of the data over the
node's links, the inter-node part moves 1/k of it per GPU over the network. Latency follows the
algorithm: a ring takes size - 1 steps (so a data-parallel gather over thousands of ranks pays
thousands of hops), a tree all-reduce 2 log2(nodes) network steps; a group that outgrows a leaf
switch climbs the fabric's tiers, each adding switch hops and losing ``spine_efficiency`` of the
rate to flow collisions.

All sizes are bytes; all results seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.plan.hardware import Cluster

# A tree all-reduce's bus bandwidth as a fraction of a ring's (each rank sends to two children,
# NCCL's tuning model gives trees about 0.9 of the ring's rate on NVLink + InfiniBand nodes).
TREE_BANDWIDTH = 0.9


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


def fabric_tiers(cluster: Cluster, nodes: int) -> int:
    """Switch tiers a group spanning ``nodes`` nodes climbs: one leaf switch (per rail) holds
    ``nodes_per_leaf`` nodes, and each tier above multiplies that by the same fan-out (a fat tree
    of radix 2 x nodes_per_leaf): 1 up to a leaf's nodes, 2 up to its square, then 3."""
    tiers, reach = 1, cluster.nodes_per_leaf
    while nodes > reach:
        tiers, reach = tiers + 1, reach * cluster.nodes_per_leaf
    return tiers


def network_rate(cluster: Cluster, nodes: int) -> float:
    """Bytes/s per GPU a collective gets from the network when it spans ``nodes`` nodes: the NIC's
    achieved rate, times ``spine_efficiency`` for every tier above the leaf (flows that leave a
    leaf are hashed onto spine links, and collisions leave some links doubly loaded)."""
    link = cluster.inter_link
    return link.achieved_bytes_per_s * link.spine_efficiency ** (fabric_tiers(cluster, nodes) - 1)


def network_latency(cluster: Cluster, nodes: int) -> float:
    """Seconds of one network step of a collective: the link's step latency plus two switch hops
    per tier above the leaf."""
    link = cluster.inter_link
    return link.step_latency_s + 2 * (fabric_tiers(cluster, nodes) - 1) * link.switch_latency_s


def _bandwidth_seconds(cluster: Cluster, shape: GroupShape, nbytes: float, factor: float) -> float:
    """Transfer time of a reduce-scatter-like pass (``factor`` = 1) or all-reduce (2) of ``nbytes``
    per rank: (k-1)/k of it over the node's links, and across nodes each member carries 1/k of it
    over its own NIC (the other members' share of the node's NICs serves the other groups running
    the same collective at once, e.g. the dp groups of the other tp ranks)."""
    k, n = shape.per_node, shape.nodes
    seconds = factor * (k - 1) / k * nbytes / cluster.intra_link.achieved_bytes_per_s if k > 1 else 0.0
    if n > 1:
        seconds += factor * (n - 1) / n * nbytes / k / network_rate(cluster, n)
    return seconds


def ring_latency(cluster: Cluster, shape: GroupShape, passes: float) -> float:
    """Latency of ``passes`` trips around a ring of the group's members (all-gather and
    reduce-scatter: 1, all-reduce: 2). A ring visits every member: size - 1 steps, of which
    nodes - 1 cross the network and the other size - nodes stay inside a node (NCCL's own ring
    model), so the latency of a data-parallel gather grows with the group, not with its nodes."""
    inter = shape.nodes - 1
    intra = shape.size - 1 - inter
    return passes * (intra * cluster.intra_link.latency_s + inter * network_latency(cluster, shape.nodes))


def tree_latency(cluster: Cluster, shape: GroupShape) -> float:
    """Latency of a tree all-reduce: a chain inside each node, a binary tree across nodes, up to
    the root and back down: 2 x ((per_node - 1) intra steps + log2(nodes) network steps)."""
    depth = math.ceil(math.log2(shape.nodes)) if shape.nodes > 1 else 0
    return 2 * ((shape.per_node - 1) * cluster.intra_link.latency_s + depth * network_latency(cluster, shape.nodes))


def all_reduce(cluster: Cluster, size: int, stride: int, nbytes: float) -> float:
    """All-reduce: 2(n-1)/n of the payload per rank. Ring, or, across nodes, a tree when that is
    faster (NCCL picks per size): the tree's latency grows with log2(nodes), but it reaches
    ``TREE_BANDWIDTH`` of the ring's rate."""
    if size <= 1:
        return 0.0
    shape = group_shape(cluster, size, stride)
    transfer = _bandwidth_seconds(cluster, shape, nbytes, 2.0)
    ring = transfer + ring_latency(cluster, shape, 2.0)
    if not shape.crosses_nodes or _partial_as_all_reduce(cluster):
        return ring
    return min(ring, transfer / TREE_BANDWIDTH + tree_latency(cluster, shape))


def _partial_as_all_reduce(cluster: Cluster) -> bool:
    return cluster.intra_link.partial_as_all_reduce or cluster.inter_link.partial_as_all_reduce


def all_gather(cluster: Cluster, size: int, stride: int, nbytes: float) -> float:
    """All-gather of a ``nbytes`` result: (n-1)/n of it per rank, one trip around the ring (NCCL
    has no tree all-gather); on gloo, an all-reduce's time."""
    if size <= 1:
        return 0.0
    if _partial_as_all_reduce(cluster):
        return all_reduce(cluster, size, stride, nbytes)
    shape = group_shape(cluster, size, stride)
    return _bandwidth_seconds(cluster, shape, nbytes, 1.0) + ring_latency(cluster, shape, 1.0)


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
