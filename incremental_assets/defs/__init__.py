"""The Dagster layer: resources, partitions, assets, sensors built from the configuration."""
