"""Expert parallelism on torch.distributed: ``parallelize`` spreads a layer's routed experts
over a DeviceMesh's ``ep`` dimension (see ``moespec.parallel.parallelize``);
``reduce_gradients`` completes the replicated parameters' gradients over it."""

from moespec.parallel.grads import reduce_gradients
from moespec.parallel.parallelize import parallelize

__all__ = ["parallelize", "reduce_gradients"]
