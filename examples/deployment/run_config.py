"""Write the `flwr run` run-config file for a fedtune experiment, after checking the experiment composes.

Usage::

    python examples/deployment/run_config.py --run-dir /srv/fedtune/runs/exp1 \\
        model=local model.path=/models/base federation.num_rounds=3 > exp1.toml
    flwr run . <connection> --stream --run-config exp1.toml

The file holds the two keys the fedtune app declares in pyproject.toml: ``overrides`` (the Hydra overrides as
one shell-quoted string) and ``run-dir`` (where the ServerApp writes checkpoints, metrics and the adapter, on
the SuperLink's machine). A TOML file avoids quoting the overrides on the command line. The experiment is
composed and validated here first, so a typo fails now instead of inside the ServerApp after submission.
"""

from __future__ import annotations

import argparse
import json
import sys

from fedtune.config import ConfigError, load_experiment, to_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="absolute path on the SuperLink's machine")
    parser.add_argument("--no-validate", action="store_true", help="skip composing the config here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=local federation.num_rounds=3")
    args = parser.parse_args()
    run_config = to_run_config(args.overrides, args.run_dir)
    if not args.no_validate:
        try:
            load_experiment(run_config)
        except ConfigError as error:
            sys.exit(f"error: {error}")
    # JSON string literals are valid TOML basic strings.
    sys.stdout.write("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()))


if __name__ == "__main__":
    main()
