"""Clusters whose node groups reach the network through different NICs (Holmes, arXiv 2312.03549).

A NIC-aware placement keeps every tensor- and data-parallel group inside one node group, so each
group's gradient traffic runs at its own NIC's speed; only pipeline sends (one activation per
micro-batch, the smallest traffic of a step) cross between groups, over the slower link. Stages
on a slower group then take fewer layers, so that every stage finishes its step at the same time.
A NIC-oblivious placement numbers ranks without looking at the groups: data-parallel rings span
both NIC types and run at the slower one's pace, and every stage has the same layers.

Stage cost is taken as proportional to its layers: a stage of k layers in group g costs k x u_g,
where u_g is the step time of the layout on a cluster made only of group g's NIC, per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.estimate import estimate
from plait.plan.hardware import Cluster
from plait.layout import Layout
from plait.plan.spec import PlanModel, PlanTrain


@dataclass(frozen=True)
class HeteroPlacement:
    stage_links: list[str]  # the NIC of the node group each pipeline stage runs in, stage order
    stage_layers: list[int]  # layers of each stage, sized to its group's speed
    step_time_s: float  # NIC-aware
    oblivious_step_time_s: float  # same layout, ranks numbered ignoring the groups

    @property
    def gain(self) -> float:
        """Speed-up of the NIC-aware placement over the oblivious one (1.25 = 25% faster)."""
        return self.oblivious_step_time_s / self.step_time_s

    def record(self) -> dict:
        return {"stage_links": self.stage_links, "stage_layers": self.stage_layers,
                "step_time_s": round(self.step_time_s, 6), "oblivious_step_time_s": round(self.oblivious_step_time_s, 6),
                "gain": round(self.gain, 4)}


def size_stages(per_layer_s: list[float], n_layers: int) -> list[int]:
    """Layers per stage minimizing the slowest stage's time, each stage at least one layer:
    each next layer goes where it lengthens the slowest stage least."""
    layers = [1] * len(per_layer_s)
    for _ in range(n_layers - len(layers)):
        best = min(range(len(layers)), key=lambda s: (layers[s] + 1) * per_layer_s[s])
        layers[best] += 1
    return layers


def place(model: PlanModel, train: PlanTrain, cluster: Cluster, layout: Layout) -> HeteroPlacement | None:
    """The NIC-aware placement of ``layout`` and its gain, or None when the layout's stages do not
    divide the node groups (a stage of tp x cp x dp GPUs must sit inside one group)."""
    if not cluster.heterogeneous or layout.pp < len(cluster.groups) or layout.vpp > 1:
        return None
    stage_gpus = layout.tp * layout.cp * layout.dp
    stages_per_group = []
    for group in cluster.groups:
        gpus = group.nodes * cluster.gpus_per_node
        if gpus % stage_gpus:
            return None
        stages_per_group.append(gpus // stage_gpus)
    per_layer = {}
    for group in cluster.groups:
        if group.inter_link.name not in per_layer:
            alone = estimate(model, train, cluster.with_inter_link(group.inter_link), layout)
            per_layer[group.inter_link.name] = alone.step_time_s * layout.pp / model.n_layers
    links = [g.inter_link.name for g, n in zip(cluster.groups, stages_per_group) for _ in range(n)]
    layers = size_stages([per_layer[name] for name in links], model.n_layers)
    aware = max(k * per_layer[name] for k, name in zip(layers, links))
    oblivious = estimate(model, train, cluster, layout).step_time_s  # build_cluster set the slowest NIC
    return HeteroPlacement(links, layers, aware, oblivious)


def rerank_nic_aware(result, model: PlanModel, train: PlanTrain, cluster: Cluster, candidates: int = 200) -> None:
    """Place the ``candidates`` fastest layouts of a search result NIC-aware (where their stages
    divide the groups), record the placements and re-rank by the placed step time, in place."""
    head = result.ranked[:candidates]
    for est in head:
        placement = place(model, train, cluster, est.layout)
        if placement is not None:
            result.placements[est.layout] = placement

    def placed_time(est) -> float:
        placement = result.placements.get(est.layout)
        return placement.step_time_s if placement else est.step_time_s

    result.ranked[:candidates] = sorted(head, key=placed_time)
