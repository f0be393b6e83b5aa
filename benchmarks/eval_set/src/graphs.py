"""Searching and graph helpers: the kind of code people paste into a chat to understand."""

import heapq
from collections import deque


def binary_search(items, target):
    """Return the index of `target` in the sorted list `items`, or -1 if it is absent."""
    low, high = 0, len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        value = items[middle]
        if value == target:
            return middle
        if value < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1


def topological_order(graph):
    """Order the nodes of a directed graph so that every edge points forward.

    `graph` maps each node to the nodes it has edges to.
    """
    indegree = {node: 0 for node in graph}
    for targets in graph.values():
        for target in targets:
            indegree[target] = indegree.get(target, 0) + 1
    ready = deque(node for node, count in indegree.items() if count == 0)
    order = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for target in graph.get(node, ()):
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
    if len(order) != len(indegree):
        raise ValueError("the graph has a cycle")
    return order


def shortest_distances(graph, source):
    """Distances from `source` to every reachable node; `graph[u]` is a list of (v, weight)."""
    distance = {source: 0}
    frontier = [(0, source)]
    while frontier:
        dist_u, u = heapq.heappop(frontier)
        if dist_u > distance[u]:
            continue  # an outdated entry: u was reached by a shorter path already
        for v, weight in graph.get(u, ()):
            candidate = dist_u + weight
            if candidate < distance.get(v, float("inf")):
                distance[v] = candidate
                heapq.heappush(frontier, (candidate, v))
    return distance


def reservoir_sample(stream, k, rng):
    """Pick k items uniformly at random from an iterable of unknown length, in one pass."""
    reservoir = []
    for seen, item in enumerate(stream):
        if seen < k:
            reservoir.append(item)
            continue
        slot = rng.randrange(seen + 1)
        if slot < k:
            reservoir[slot] = item
    return reservoir
