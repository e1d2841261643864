"""Expert parallelism on torch.distributed: ``parallelize`` spreads a layer's routed experts
over a DeviceMesh's ``ep`` dimension (see ``moespec.parallel.parallelize``)."""

from moespec.parallel.parallelize import parallelize

__all__ = ["parallelize"]
