"""The built-in data generators' parts.

The public modules are :mod:`stepwise.data.synthetic` (the shape x colour x texture set, ``generator=shapes``)
and :mod:`stepwise.data.emoji_lvis` (the OpenMoji benchmark, ``generator=emoji``); this package holds what
they are made of:

* :mod:`.common`: what both share: the output directory written atomically (temporary sibling, signals,
  stale temporaries), the rendering pool, the LVIS v1 records (images, annotations, categories, document),
  LVIS frequencies from image counts and the not-exhaustive images;
* ``shapes_*``: the shape set's presets and plan types, its planning and its rendering;
* ``emoji_*``: the emoji set's artwork, vocabulary (families of look-alikes), planning and rendering.
"""
