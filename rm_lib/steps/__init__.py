"""One module per pipeline step. Each exposes `run(params, layout) -> result`; the CLI, the DVC
stages and the Dagster assets all call these and nothing else."""
