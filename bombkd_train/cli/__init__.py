"""The ``bombkd`` command. The modules, in the order a user meets them:

    main.py        the typer app; each group below adds its commands
    data.py        sample-data, probe
    featurize.py   featurize
    cache.py       inspect, import-cache
    train.py       train-converters, train, eval, demo
    _common.py     what every command does with a bad input (one line, exit code 2)
"""
