"""Studies built on the library: the paper's baselines and reproduction, and the attack, link and
strategy studies (each run by a script of the same name in ``experiments/``)."""
