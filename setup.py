"""The packages to install: rlpa_jax with its subpackages, and the repository's top-level configs/
(the YAML configs and prompts, where users look for them) inside it as rlpa_jax/_configs, so an
installed wheel carries them (rlpa_jax/config/options.py finds either). Everything else about the
project is pyproject.toml; this lives here because pyproject.toml cannot both find the packages
and map a directory outside them into one.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["rlpa_jax", "rlpa_jax.*"]), "rlpa_jax._configs", "rlpa_jax._configs.prompts"],
    package_dir={"rlpa_jax._configs": "configs"},
    package_data={"rlpa_jax._configs": ["*.yaml"], "rlpa_jax._configs.prompts": ["*.txt"]},
)
