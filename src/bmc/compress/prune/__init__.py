"""Pruning in Torch-Pruning's parts: the dependency graph (graph), what channels and residual blocks
are worth (importance), the cuts and the --prune-strategy registry (strategies), which channels go
at one ratio (channels), the ratio search and its driver prune_structured (search), what a cut
reports (outcome), magnitude pruning (magnitude), timing on the target (latency), sizes (measure).
The stages that use them are bmc.compress.pruning."""
