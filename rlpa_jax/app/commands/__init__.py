"""The programs, one module each with `main(argv) -> exit status`: python launch/<name>.py runs one
from a checkout, the installed console commands (rlpa-train, ...: rlpa_jax/app/console.py) from
anywhere."""
