"""Launching over torchrun, SLURM and MPI; distributed initialisation; preflight; configuration.

- :func:`init_distributed` starts torch.distributed however the script was launched (torchrun, srun,
  mpirun) and returns a :class:`DistContext`.
- :func:`plan_launch` / :func:`launch` are ``dualflow launch``: torchrun's elastic agent with the node
  layout read from the environment (:func:`detect_site`) and one log per rank.
- :func:`load_config` and friends parse TOML plus ``--section.key=value`` overrides into dataclasses.
- :class:`GpuTelemetry` reads NVML without ever raising; ``dualflow doctor`` is :mod:`.doctor`.
"""

from dualflow.launcher.config import (
    ConfigError,
    OneOf,
    Range,
    add_config_arguments,
    check_fields,
    config_from_args,
    config_keys,
    load_config,
    log_config,
    save_config,
    split_overrides,
    to_dict,
    to_toml,
)
from dualflow.launcher.dist import DistContext, init_distributed
from dualflow.launcher.env import LauncherError, Placement, Site, detect_process, detect_site, recommended_env
from dualflow.launcher.launch import LaunchPlan, launch, plan_launch
from dualflow.launcher.nodelist import expand_nodelist, expand_tasks_per_node, hostnames
from dualflow.launcher.nvml import GpuTelemetry

__all__ = [
    "ConfigError",
    "DistContext",
    "GpuTelemetry",
    "LaunchPlan",
    "LauncherError",
    "OneOf",
    "Placement",
    "Range",
    "Site",
    "add_config_arguments",
    "check_fields",
    "config_from_args",
    "config_keys",
    "detect_process",
    "detect_site",
    "expand_nodelist",
    "expand_tasks_per_node",
    "hostnames",
    "init_distributed",
    "launch",
    "load_config",
    "log_config",
    "plan_launch",
    "recommended_env",
    "save_config",
    "split_overrides",
    "to_dict",
    "to_toml",
]
