"""The registry database: tenants, keys, files, jobs, adapters, evaluations and usage (see ``schema``)."""
