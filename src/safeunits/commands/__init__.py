"""The command line's commands, one module per group (`safeunits.cli` lists them and imports one only when it runs).

Why a package of their own, on the top floor: a command may drive any layer (an experiment preset, a patch, an
evaluation), so the commands sit above all of them; no library module imports them (tests/test_import_graph.py).
"""
