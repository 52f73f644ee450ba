"""kdmtl's Hydra configs, shipped as the package `kdmtl_cli.conf`.

Hydra imports this package to read the configs (pkg://kdmtl_cli.conf), so importing it
registers what the configs refer to: the typed schemas and the `kdmtl_run_id` resolver.
This also makes Hydra's compose API work on these configs outside the CLI.
"""

from kdmtl_cli.cli import register_resolvers as _register_resolvers
from kdmtl_cli.schema import register_schemas as _register_schemas

_register_schemas()
_register_resolvers()
