"""Applications built on the batch-job runner (the data wrangling tasks of `flexbatch wrangle`)."""
