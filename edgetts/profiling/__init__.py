"""``edgetts profile``: sweeps of model variants x strategies x budgets x parallelism on the device."""
