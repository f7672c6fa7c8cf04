"""The jobs: what takes a config and a workdir and runs there (the search driver and its
settings, build, storage, caching and summary, the defended search, pre-training, export of
a searched genome). The library below (models, quantizers, genomes, data, costs, training
steps, ``privacy``, ``search``, ``deploy``) never imports this package or ``studies``."""
