"""Promptable slice models (SAM-2.1, LiteMedSAM) behind one interface, :class:`Backbone`.

Use :func:`sss_lib.backbones.registry.build_backbone` to build one by name; importing this package
imports no torch.
"""
