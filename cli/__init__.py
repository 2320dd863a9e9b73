"""The ``trackin-ooc`` command-line application (installed as the ``trackin_ooc_cli`` package)."""
