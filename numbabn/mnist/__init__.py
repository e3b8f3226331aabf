"""The MNIST app: data (:mod:`~numbabn.mnist.data`, with the data set shipped in
``numbabn/mnist/dataset``), models (:mod:`~numbabn.mnist.models`), checkpoints
(:mod:`~numbabn.mnist.checkpoint`), the trainer (:mod:`~numbabn.mnist.train`),
its data-parallel version on MPI (:mod:`~numbabn.mnist.distributed`) and the
``numbabn-mnist`` command (:mod:`~numbabn.mnist.cli`).  Built on the layer kit
(:mod:`numbabn.kit`) and the normalization library (:mod:`numbabn`)."""
