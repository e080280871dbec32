"""The patch adapter (peft type ``"PATCHER"``): a PEFT tuner that grows Transformer-Patcher neurons in one FFN.

One module per idea: ``config`` (PatcherConfig), ``layer`` (PatcherLayer, the neurons), ``model`` (PatcherModel,
``get_patcher_model``), ``keys`` (the pre-activation and key initialisation), ``schema`` (its tensors, declared
once), ``patch_file`` (reading a weights file), ``patch_set`` (a saved folder). The package itself imports nothing,
so the schema reads without torch; the public names are ``transformer_patcher.PatcherConfig`` and so on.
"""
