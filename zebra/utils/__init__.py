"""Small helpers with no home of their own and no training-stack imports: where the configs are."""
