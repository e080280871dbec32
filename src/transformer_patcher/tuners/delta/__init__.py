"""The weight-delta adapter (peft type ``"DELTA"``): a PEFT tuner adding a closed-form low-rank ``ΔW = up @ down``
to selected layers.

PMET/MEMIT-style mass editors compute the factors of each edited layer's update in closed form; this adapter only
stores them (never trains them), adds ``x @ (up @ down)ᵀ`` in the forward pass, and merges, unloads, saves and loads
like any peft adapter. Modules: ``config``, ``layer``, ``model``, ``schema``, ``delta_file``, ``delta_set``; the
package itself imports nothing.
"""
