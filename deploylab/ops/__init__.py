"""Operating the deployed model (lessons 09 and 10): monitoring with Prometheus, tested alerts, drift, rollout.

Imports nothing, so that a server or a notebook loads only the module it needs
(``deploylab.ops.prometheus``, ``deploylab.ops.drift``, ``deploylab.ops.registry``...).
"""
