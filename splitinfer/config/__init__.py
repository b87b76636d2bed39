"""Configuration: process settings (`SPLITINFER_*` environment variables, pydantic-settings) and the cluster file
schema (cluster.toml). Pure: imports no broker code."""

from splitinfer.config.cluster import ClusterConfig, ConfigError, ServerSpec
from splitinfer.config.settings import Settings, get_settings

__all__ = ["ClusterConfig", "ConfigError", "ServerSpec", "Settings", "get_settings"]
