"""Host-side planning of visible-only forwards (numpy; runs in the DataLoader workers).

* :mod:`.masking`: the unit grid, random and seeded masks, their checks (True = masked);
* :mod:`.windows`: each stage's visible tokens and their attention windows;
* :mod:`.grouping`: the grouping solver (windows -> equal-size groups at minimal attention cost);
* :mod:`.static_shapes`: fixed ``(num_groups, group_size)`` shapes for ``torch.compile`` / CUDA graphs;
* :mod:`.slots`: where each token sits in its group (the gather indices of one attention);
* :mod:`.geometry`: 3x3 neighbour indices for the sparse convolutions;
* :mod:`.planner`: :class:`VisiblePlanner`, mask -> :class:`HostPlan` (and its copy to the device);
* :mod:`.collate`: :class:`MaskCollator`, which draws and plans each batch's masks in the workers.

Nothing here reads the images or the weights; :mod:`greenmim.ops` consumes the plans on the device.
"""
