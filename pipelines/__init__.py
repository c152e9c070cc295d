"""Pipeline definitions (KFP v2). Importing them needs kfp but never torch."""
