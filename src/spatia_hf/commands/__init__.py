"""Sub-commands of the ``spatia`` CLI; each module has ``register(subparsers)``."""
