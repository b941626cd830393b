"""The driver-side Python API: deploying models (:mod:`.deploy`) and asking them (:mod:`.chat`)."""
