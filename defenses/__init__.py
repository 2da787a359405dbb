"""Built-in defenses, one module per defense; each registers itself with ``@register_defense``.

They are found through the ``certbench.defenses`` entry-point group like any third-party
plugin (see :mod:`bench.registry`); certbench's ``pyproject.toml`` lists them.
"""
